"""Uploads and stored adapters against a real server: an upload goes to disk as it arrives, so
its size never becomes the server's memory; concurrent uploads are bounded per tenant and per
server; a full disk is RESOURCE_EXHAUSTED and leaves nothing behind; a stored adapter whose
files were changed is DATA_LOSS; unregistering fails what was queued for it with NOT_FOUND."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.server_process import running_server, start_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    base = init_model(root / "base", "deepseek-v3", "tiny", seed=31)
    imports = root / "imports"
    for i in range(3):
        make_random_adapter(base, imports / f"a{i}", r=8, target="attention", seed=40 + i)
    return {"root": root, "base": base, "imports": imports}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


class HeldUpload:
    """An upload that sends its header, its config and the first half of its weights, then waits
    for `release()` before sending the rest: an upload in progress, for as long as a test needs one."""

    def __init__(self, srv, name: str, directory: Path, metadata=()) -> None:
        self._go = threading.Event()
        self._sent_first = threading.Event()
        self.result: queue.Queue = queue.Queue()
        weights = (directory / WEIGHTS).read_bytes()
        self.first_bytes = first_bytes = len(weights) // 2

        def messages():
            yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name))
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=CONFIG, data=(directory / CONFIG).read_bytes()))
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=WEIGHTS, data=weights[:first_bytes]))
            self._sent_first.set()
            self._go.wait(60)
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=WEIGHTS, data=weights[first_bytes:]))

        def run() -> None:
            try:
                self.result.put(srv.adapters.UploadAdapter(messages(), timeout=90, metadata=metadata))
            except grpc.RpcError as exc:
                self.result.put(exc)
        self._thread = threading.Thread(target=run)
        self._thread.start()
        assert self._sent_first.wait(30)

    def release(self):
        self._go.set()
        self._thread.join(90)
        return self.result.get(timeout=1)


def test_upload_is_written_to_disk_as_it_arrives_and_uploads_are_bounded(world):
    store = world["root"] / "store-caps"
    with running_server(world["root"], world["base"], store, "--quantization", "none",
                        "--max-concurrent-uploads-per-tenant", "2") as srv:
        a0 = world["imports"] / "a0"
        held = [HeldUpload(srv, f"held{i}", a0) for i in range(2)]
        time.sleep(0.5)  # the server has written what arrived
        staging = [p for p in store.iterdir() if p.name.startswith(".tmp-upload-")]
        assert len(staging) == 2, sorted(p.name for p in store.iterdir())
        for folder in staging:  # on disk already: the config whole, the first half of the weights
            assert (folder / CONFIG).read_bytes() == (a0 / CONFIG).read_bytes()
            assert (folder / WEIGHTS).stat().st_size == held[0].first_bytes
        third = HeldUpload(srv, "third", a0)
        outcome = third.release()
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "has 2 uploads in progress, its limit" in outcome.details()
        for upload in held:
            assert upload.release().created
        assert not [p for p in store.iterdir() if p.name.startswith(".tmp-")]
        names = {a.manifest.name for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
        assert names == {"held0", "held1"}


def test_a_cancelled_upload_leaves_nothing_behind(world):
    store = world["root"] / "store-cancel"
    with running_server(world["root"], world["base"], store, "--quantization", "none") as srv:
        a1 = world["imports"] / "a1"
        weights = (a1 / WEIGHTS).read_bytes()
        stop = threading.Event()

        def messages():
            yield apb.UploadAdapterRequest(header=apb.UploadHeader(name="gone"))
            yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=WEIGHTS, data=weights[:4096]))
            stop.wait(30)
        call = srv.adapters.UploadAdapter.future(messages(), timeout=60)
        deadline = time.monotonic() + 10
        while not any(p.name.startswith(".tmp-upload-") for p in store.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        call.cancel()
        stop.set()
        # And cancelled at other moments: before the server has the header, between two chunks.
        for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
            def chunks():
                yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=f"gone-{delay}"))
                for start in range(0, len(weights), 512):
                    yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=WEIGHTS,
                                                                       data=weights[start:start + 512]))
                    time.sleep(0.002)
            late = srv.adapters.UploadAdapter.future(chunks(), timeout=60)
            time.sleep(delay)
            late.cancel()
        deadline = time.monotonic() + 10
        while any(p.name.startswith(".tmp-") for p in store.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(p.name.startswith(".tmp-") for p in store.iterdir())
        assert not srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs user and mount namespaces (unshare -Urm) for a small tmpfs")
def test_a_full_disk_is_resource_exhausted_and_leaves_the_store_whole(world):
    """The store is a 1 MiB tmpfs, mounted in the server's own mount namespace: a 0.7 MB adapter
    fits, a second one does not."""
    store = world["root"] / "store-full"
    store.mkdir()
    big = world["root"] / "big"
    make_random_adapter(world["base"], big, r=64, target="all-linear", seed=5)
    assert 550_000 < (big / WEIGHTS).stat().st_size < 800_000, (big / WEIGHTS).stat().st_size
    prefix = ("unshare", "-Urm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{store}" && exec "$@"', "sh")
    srv = start_server(world["root"], world["base"], store, "--quantization", "none", "--max-lora-rank", "64",
                       prefix=prefix)
    try:
        srv.wait_serving()
        inside = Path(f"/proc/{srv.process.pid}/root") / str(store).lstrip("/")  # the store as the server sees it

        def upload(name: str):
            def messages():
                yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name))
                for file_name in (CONFIG, WEIGHTS):
                    data = (big / file_name).read_bytes()
                    for start in range(0, len(data), 1 << 20):
                        yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=file_name,
                                                                           data=data[start:start + (1 << 20)]))
            return srv.adapters.UploadAdapter(messages(), timeout=60)
        assert upload("first").created
        code, details = code_of(lambda: upload("second"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the adapter store is full" in details, details
        assert not [p.name for p in inside.iterdir() if p.name.startswith(".tmp-")]
        listed = [a.manifest.name for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
        assert listed == ["first"]
        req = ipb.GenerateRequest(input=ipb.GenerationInput(adapter="first", prompt="hi",
                                                            sampling=ipb.SamplingParams(max_new_tokens=3)))
        assert srv.inference.Generate(req, timeout=60).summary.usage.completion_tokens == 3
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_a_tampered_stored_adapter_is_data_loss(world):
    store = world["root"] / "store-tamper"
    with running_server(world["root"], world["base"], store, "--quantization", "none", "--import-roots",
                        str(world["imports"]), "--max-loras", "1", "--max-cpu-loras", "1") as srv:
        for name in ("a0", "a1"):  # a1 pushes a0 out of host memory: a0's next request reads the disk
            srv.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name=name, path=name), timeout=60)
        weights = store / "default" / "a0" / "current" / WEIGHTS
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one bit pattern of one weight: the file still parses
        weights.chmod(0o644)
        weights.write_bytes(bytes(data))
        req = ipb.GenerateRequest(input=ipb.GenerationInput(adapter="a0", prompt="hi",
                                                            sampling=ipb.SamplingParams(max_new_tokens=3)))
        code, details = code_of(lambda: srv.inference.Generate(req, timeout=60))
        assert code == grpc.StatusCode.DATA_LOSS, details
        assert details.startswith("adapter 'a0': its stored files no longer match"), details
        listed = [a.manifest.name for a in srv.adapters.ListAdapters(apb.ListAdaptersRequest()).adapters]
        assert "a0" in listed  # still listed: the operator sees it and publishes it again
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert 'loraserve_adapter_data_loss_total{adapter="a0",tenant="default"} 1.0' in metrics
        assert 'loraserve_requests_total{adapter="a0",code="DATA_LOSS",tenant="default"} 1.0' in metrics


def test_unregister_fails_what_is_queued_for_it_with_not_found(world):
    store = world["root"] / "store-unregister"
    with running_server(world["root"], world["base"], store, "--quantization", "none", "--import-roots",
                        str(world["imports"]), "--max-loras", "1", "--max-new-tokens", "512") as srv:
        for name in ("a0", "a1"):
            srv.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name=name, path=name), timeout=60)
        # a0 holds the only slot for a long generation; a1's requests wait for it.
        long = srv.inference.GenerateStream(ipb.GenerateStreamRequest(input=ipb.GenerationInput(
            adapter="a0", prompt="Tell me a long story", sampling=ipb.SamplingParams(max_new_tokens=500))), timeout=120)
        next(iter(long))
        waiting = [srv.inference.Generate.future(ipb.GenerateRequest(input=ipb.GenerationInput(
            adapter="a1", prompt=f"question {i}", sampling=ipb.SamplingParams(max_new_tokens=4))), timeout=60)
            for i in range(4)]
        time.sleep(0.5)
        srv.adapters.UnregisterAdapter(apb.UnregisterAdapterRequest(name="a1"), timeout=60)
        for future in waiting:
            exc = future.exception(timeout=60)
            assert exc is not None and exc.code() == grpc.StatusCode.NOT_FOUND, exc
            assert "'a1'" in exc.details() and "default/" not in exc.details(), exc.details()
        long.cancel()
        assert not (store / "default" / "a1").exists()


def test_uploads_beyond_the_server_limit_are_resource_exhausted(world, tmp_path):
    """Per server: with keys, two tenants of one upload each fill a server limit of two."""
    from loraserve.access.key_admin import add_key

    keys_file = tmp_path / "keys.yaml"
    keys = {t: add_key(keys_file, f"{t}-man", t, "manage") for t in ("t1", "t2", "t3")}
    store = world["root"] / "store-server-cap"
    with running_server(world["root"], world["base"], store, "--quantization", "none", "--api-keys-file",
                        str(keys_file), "--max-concurrent-uploads", "2") as srv:
        a2 = world["imports"] / "a2"

        def holder(tenant: str) -> HeldUpload:
            return HeldUpload(srv, f"{tenant}-a", a2, metadata=(("authorization", f"Bearer {keys[tenant]}"),))
        first, second = holder("t1"), holder("t2")
        time.sleep(0.3)
        outcome = holder("t3").release()
        assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the server is receiving 2 uploads, its limit" in outcome.details()
        assert first.release().created and second.release().created
