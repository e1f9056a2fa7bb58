"""TLS and mTLS as deployed: real `loraserve serve` processes on 127.0.0.1 with certificates
from a throwaway PKI (tests/tls_helpers.py), reached by the Python clients and the CLI. Two
server starts in all: one TLS server, one mTLS server.

The TLS server reads its certificate through a Kubernetes-style Secret layout (files behind a
`..data` symlink), so the rotation test can swap it the way the kubelet does."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_helpers import Pki, make_pki

from loraserve.client import AsyncLoraserveClient, Generation, LoraserveClient, LoraserveClientError
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model

ROOT = Path(__file__).resolve().parents[2]

SERVER_FLAGS = ("--quantization", "none", "--max-new-tokens", "16", "--max-input-tokens", "64")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tls")
    return {"root": root, "base": init_model(root / "base", "deepseek-v3", "tiny", seed=0), "pki": make_pki(root / "pki")}


def _secret_volume(mount: Path, version: str, cert: str, key: str) -> None:
    """Point mount/{tls.crt,tls.key} at a new version, as the kubelet updates a Secret volume."""
    directory = mount / f"..{version}"
    directory.mkdir(parents=True)
    shutil.copy(cert, directory / "tls.crt")
    shutil.copy(key, directory / "tls.key")
    (mount / "..data_tmp").symlink_to(directory.name)
    os.replace(mount / "..data_tmp", mount / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")


def _ca_credentials(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """Raw channel credentials for the harness's stubs (the clients build their own)."""
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraserve", *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def tls_server(world):
    pki: Pki = world["pki"]
    mount = world["root"] / "secret"
    _secret_volume(mount, "v1", pki.server_cert, pki.server_key)
    with running_server(world["root"], world["base"], world["root"] / "store-tls", *SERVER_FLAGS,
                        "--tls-cert", str(mount / "tls.crt"), "--tls-key", str(mount / "tls.key"),
                        credentials=_ca_credentials(pki.ca)) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(world):
    pki: Pki = world["pki"]
    with running_server(world["root"], world["base"], world["root"] / "store-mtls", *SERVER_FLAGS,
                        "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca,
                        credentials=_ca_credentials(pki.ca, pki.client_cert, pki.client_key)) as srv:
        yield srv


def _failure(**client_args) -> LoraserveClientError:
    target = client_args.pop("target")
    with pytest.raises(LoraserveClientError) as exc, LoraserveClient(target, timeout=10, **client_args) as client:
        client.generate("hello", max_new_tokens=2)
    return exc.value


def test_tls_client_trusting_the_ca_generates(tls_server, world):
    pki: Pki = world["pki"]
    with LoraserveClient(tls_server.target, timeout=60, tls_ca=pki.ca) as client:
        g = client.generate("The patient presents with", max_new_tokens=4)
        assert g.completion_tokens == 4
        streamed = list(client.generate_stream("The patient presents with", max_new_tokens=4))
        assert isinstance(streamed[-1], Generation) and streamed[-1].token_ids == g.token_ids
    # The certificate names localhost too: a client connecting by IP may ask for that name.
    with LoraserveClient(tls_server.target, timeout=60, tls_ca=pki.ca, tls_server_name="localhost") as client:
        assert client.health() == "SERVING"


def test_tls_refuses_plaintext_a_wrong_ca_and_a_wrong_name(tls_server, world):
    pki: Pki = world["pki"]
    assert _failure(target=tls_server.target).code == "UNAVAILABLE"  # plaintext to a TLS port
    assert _failure(target=tls_server.target, tls_ca=pki.wrong_ca).code == "UNAVAILABLE"
    assert _failure(target=tls_server.target, tls_ca=pki.ca, tls_server_name="other.example").code == "UNAVAILABLE"
    assert _failure(target=tls_server.target, tls=True).code == "UNAVAILABLE"  # system roots do not know our CA


def test_cli_flags_reach_a_tls_server(tls_server, world):
    pki: Pki = world["pki"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return _cli(*args, "--server", tls_server.target, "--timeout", "60")

    ok = run("generate", "hello", "--max-new-tokens", "3", "--no-stream", "--tls-ca", pki.ca)
    assert ok.returncode == 0 and "3 new tokens" in ok.stderr, ok.stderr
    refused = run("health", "--tls-ca", pki.wrong_ca)
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAVAILABLE"), refused.stderr
    half = run("health", "--tls-ca", pki.ca, "--tls-cert", pki.client_cert)
    assert half.returncode == 2 and "tls_cert and tls_key go together" in half.stderr
    missing = run("health", "--tls-ca", str(world["root"] / "nope.pem"))
    assert missing.returncode == 2 and "cannot read the TLS CA bundle" in missing.stderr
    assert "Traceback" not in half.stderr + missing.stderr


def test_mtls_client_with_a_certificate_from_the_ca_generates(mtls_server, world):
    pki: Pki = world["pki"]
    with LoraserveClient(mtls_server.target, timeout=60, tls_ca=pki.ca, tls_cert=pki.client_cert,
                         tls_key=pki.client_key) as client:
        assert client.generate("hello", max_new_tokens=3).completion_tokens == 3

    async def over_asyncio() -> int:
        async with AsyncLoraserveClient(mtls_server.target, timeout=60, tls_ca=pki.ca, tls_cert=pki.client_cert,
                                        tls_key=pki.client_key) as client:
            return (await client.generate("hello", max_new_tokens=2)).completion_tokens

    assert asyncio.run(over_asyncio()) == 2
    cli = _cli("health", "--server", mtls_server.target, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
               "--tls-key", pki.client_key, "--timeout", "30")
    assert cli.returncode == 0 and cli.stdout.strip() == "SERVING", cli.stderr


def test_mtls_refuses_clients_without_a_certificate_from_its_ca(mtls_server, world):
    pki: Pki = world["pki"]
    assert _failure(target=mtls_server.target, tls_ca=pki.ca).code == "UNAVAILABLE"
    assert _failure(target=mtls_server.target, tls_ca=pki.ca, tls_cert=pki.wrong_client_cert,
                    tls_key=pki.wrong_client_key).code == "UNAVAILABLE"
    assert _failure(target=mtls_server.target).code == "UNAVAILABLE"


def _health_over_new_connection(target: str, ca: str) -> str:
    """SERVING or the status code, over a channel that shares no connection with any other (so
    it makes a new TLS handshake, which is when the server looks at its files)."""
    channel = grpc.secure_channel(target, _ca_credentials(ca), options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def test_certificate_rotation_without_restart(tls_server, world):
    """cert-manager renews into the Secret, the kubelet swaps `..data`: new connections get the
    new certificate at once, the process keeps running, connections already open keep working."""
    pki: Pki = world["pki"]
    pid = tls_server.process.pid
    try:
        _secret_volume(world["root"] / "secret", "v2", pki.wrong_server_cert, pki.wrong_server_key)
        assert _health_over_new_connection(tls_server.target, pki.wrong_ca) == "SERVING"
        assert _health_over_new_connection(tls_server.target, pki.ca) == "UNAVAILABLE"
        # The harness's channel connected before the swap: its connection is still good.
        reply = tls_server.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:  # back to the original certificate, which the other tests of this server expect
        _secret_volume(world["root"] / "secret", "v3", pki.server_cert, pki.server_key)
    assert _health_over_new_connection(tls_server.target, pki.ca) == "SERVING"
    assert tls_server.process.poll() is None and tls_server.process.pid == pid
    assert "TLS files changed" in tls_server.log()
