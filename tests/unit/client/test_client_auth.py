"""The client side of API keys: every RPC of both clients (unary, streamed, uploads) carries
`authorization: Bearer <key>`, the key comes from LORASERVE_API_KEY by default, UNAUTHENTICATED
and PERMISSION_DENIED reach the caller as LoraserveClientError, and the key never shows in a
repr. Against a real gRPC server on 127.0.0.1 whose interceptor plays the server's key check;
the servicers are the generated defaults (UNIMPLEMENTED), which is as far as a call gets once
its key is accepted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from fake_grpc import fake_server

from loraserve.cli import main
from loraserve.client import AsyncLoraserveClient, LoraserveClient, LoraserveClientError
from loraserve.proto.v1 import adapters_pb2_grpc, inference_pb2_grpc, server_info_pb2_grpc

GOOD, READ_ONLY = "lsk_good", "lsk_read_only"


class KeyCheck(grpc.ServerInterceptor):
    """Records each call's metadata; no key or an unknown one: UNAUTHENTICATED, READ_ONLY:
    PERMISSION_DENIED, GOOD: on to the servicer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.routing: list[tuple[str, tuple]] = []  # the `adapter` header, for replica routing

    def intercept_service(self, continuation, details):
        metadata = tuple((m.key, m.value) for m in details.invocation_metadata if m.key == "authorization")
        self.calls.append((details.method.rsplit("/", 1)[-1], metadata))
        self.routing.append((details.method.rsplit("/", 1)[-1],
                             tuple(m.value for m in details.invocation_metadata if m.key == "adapter")))
        handler = continuation(details)
        if metadata == (("authorization", f"Bearer {GOOD}"),) or handler is None:
            return handler
        if metadata == (("authorization", f"Bearer {READ_ONLY}"),):
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED, "role generate does not allow this")
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `code`."""
    def unary(request, context):
        context.abort(code, details)

    def streaming(request, context):
        context.abort(code, details)
        yield  # never reached; makes this a generator, as a response-streaming handler must be

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(streaming if handler.response_streaming else unary, handler.request_deserializer,
                handler.response_serializer)


@pytest.fixture
def fake() -> Iterator[tuple[str, KeyCheck]]:
    check = KeyCheck()
    with fake_server(inference_pb2_grpc.InferenceServiceServicer(), adapters_pb2_grpc.AdapterServiceServicer(),
                     server_info_pb2_grpc.ServerInfoServiceServicer(), interceptors=(check,)) as target:
        yield target, check


@pytest.fixture
def adapter_dir(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"{}")
    return tmp_path


METHODS = ("Generate", "GenerateStream", "RegisterAdapter", "UploadAdapter", "ValidateAdapter", "UnregisterAdapter",
           "ListAdapters", "GetAdapter", "PinAdapter", "UnpinAdapter", "GetServerInfo", "Check")


def _every_call(client: LoraserveClient, adapter_dir) -> list[str]:
    """Each client method once; the status code each ended with."""
    calls = [lambda: client.generate("hi"), lambda: list(client.generate_stream("hi")),
             lambda: client.register_adapter("a", "p"), lambda: client.upload_adapter("a", adapter_dir),
             lambda: client.validate_adapter("a", "p"), lambda: client.unregister_adapter("a"),
             client.list_adapters, lambda: client.get_adapter("a"), lambda: client.pin_adapter("a"),
             lambda: client.unpin_adapter("a"), client.server_info, client.health]
    codes = []
    for call in calls:
        try:
            codes.append(("OK", call())[0])
        except LoraserveClientError as exc:
            codes.append(exc.code)
    return codes


def test_every_rpc_carries_the_key(fake, adapter_dir, monkeypatch):
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    target, check = fake
    with LoraserveClient(target, timeout=5, api_key=GOOD) as client:
        codes = _every_call(client, adapter_dir)
    assert codes == ["UNIMPLEMENTED"] * 11 + ["OK"]  # past the key check, every one of them
    assert [m for m, _ in check.calls] == list(METHODS)
    assert all(md == (("authorization", f"Bearer {GOOD}"),) for _, md in check.calls)


def test_refusals_reach_the_caller_as_client_errors(fake, adapter_dir, monkeypatch):
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    target, check = fake
    with LoraserveClient(target, timeout=5) as client:
        assert _every_call(client, adapter_dir) == ["UNAUTHENTICATED"] * 12
        with pytest.raises(LoraserveClientError) as exc:
            client.list_adapters()
        assert exc.value.message == "missing or unknown API key"
    assert all(md == () for _, md in check.calls)  # no key: no authorization header at all
    with LoraserveClient(target, timeout=5, api_key=READ_ONLY) as client:
        assert _every_call(client, adapter_dir) == ["PERMISSION_DENIED"] * 12


def test_the_key_defaults_to_the_environment(fake, monkeypatch):
    target, _ = fake
    monkeypatch.setenv("LORASERVE_API_KEY", GOOD + "\n")  # as read from a file: the newline is dropped
    with LoraserveClient(target, timeout=5) as client:
        assert client.health() == "SERVING"
    with LoraserveClient(target, timeout=5, api_key="") as client, pytest.raises(LoraserveClientError) as exc:
        client.health()  # "" sends no key even when the environment has one
    assert exc.value.code == "UNAUTHENTICATED"
    with LoraserveClient(target, timeout=5, api_key=READ_ONLY) as client, pytest.raises(LoraserveClientError) as exc:
        client.health()  # an explicit key wins over the environment
    assert exc.value.code == "PERMISSION_DENIED"


def test_async_client_sends_the_key_on_unary_stream_and_upload_calls(fake, adapter_dir, monkeypatch):
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    target, check = fake

    async def scenario(api_key: str) -> list[str]:
        codes = []
        async with AsyncLoraserveClient(target, timeout=5, api_key=api_key) as client:
            for call in (lambda: client.generate("hi"), lambda: _drain(client.generate_stream("hi")),
                         lambda: client.upload_adapter("a", adapter_dir), client.health):
                try:
                    await call()
                    codes.append("OK")
                except LoraserveClientError as exc:
                    codes.append(exc.code)
        return codes

    async def _drain(stream) -> None:
        async for _ in stream:
            pass

    assert asyncio.run(scenario(GOOD)) == ["UNIMPLEMENTED"] * 3 + ["OK"]
    assert [m for m, _ in check.calls] == ["Generate", "GenerateStream", "UploadAdapter", "Check"]
    assert all(md == (("authorization", f"Bearer {GOOD}"),) for _, md in check.calls)
    assert asyncio.run(scenario("")) == ["UNAUTHENTICATED"] * 4


def test_the_cli_takes_the_key_from_the_flag_or_the_environment(fake, capsys, monkeypatch):
    target, _ = fake
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    assert main(["health", "--server", target, "--timeout", "5"]) == 1
    assert capsys.readouterr().err == "error: UNAUTHENTICATED: missing or unknown API key\n"
    assert main(["health", "--server", target, "--timeout", "5", "--api-key", GOOD]) == 0
    monkeypatch.setenv("LORASERVE_API_KEY", GOOD)
    assert main(["health", "--server", target, "--timeout", "5"]) == 0
    assert capsys.readouterr().out == "SERVING\nSERVING\n"


def test_constructor_checks_and_no_key_in_reprs(tmp_path, monkeypatch):
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    secret = "lsk_0123456789ab_" + "s" * 43
    client = LoraserveClient("127.0.0.1:1", api_key=secret)
    assert secret not in repr(client) and "api_key=set" in repr(client)
    client.close()
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        LoraserveClient("127.0.0.1:1", tls_cert=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="cannot read the TLS CA bundle"):
        LoraserveClient("127.0.0.1:1", tls_ca=str(tmp_path / "none.pem"))
    with pytest.raises(ValueError, match="printable ASCII") as exc:
        LoraserveClient("127.0.0.1:1", api_key="lsk_x\nEvil: 1")
    assert "Evil" not in str(exc.value)
    assert main(["health", "--server", "127.0.0.1:1", "--tls-key", str(tmp_path / "k.pem")]) == 2


def test_generation_calls_carry_the_adapter_for_routing(fake, monkeypatch):
    """A proxy in front of replicas can hash on the `adapter` header to keep an adapter's
    requests on one replica; other calls and base-model calls carry none."""
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    target, check = fake
    with LoraserveClient(target, timeout=5, api_key=GOOD) as client:
        for call in (lambda: client.generate("hi", adapter="med"), lambda: list(client.generate_stream("hi", adapter="med")),
                     lambda: client.generate("hi"), lambda: client.list_adapters()):
            try:
                call()
            except LoraserveClientError:
                pass
    assert [h for _, h in check.routing] == [("med",), ("med",), (), ()]
