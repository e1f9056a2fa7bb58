"""The engine in its own process (`RemoteEngine` <-> `loraserve.engine.engine_process`): the same
answers as the engine in this process, errors that arrive on the stream with their own type, and
no request or process left behind when either side dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from model_fixtures import collect, greedy_request, running_engine

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.server_process import start_server
from loraserve.engine.engine_process import EngineFault
from loraserve.engine.remote import RemoteEngine
from loraserve.engine.request import GenerationRequest, SamplingParams
from loraserve.errors import AdapterIncompatible, AdapterNotFound, InvalidArgument, Unavailable
from loraserve.proto.v1 import inference_pb2 as ipb

ARCH = "deepseek-v3"
PROMPTS = ["The patient presents with", "def parse(path):", "Summarise the clause:"]


def _config(base_dir: Path, **limits) -> EngineConfig:
    return EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization="none"), **limits)


@pytest.fixture(scope="module")
def remote(base_dirs):
    gone = threading.Event()
    client = RemoteEngine.load(_config(base_dirs[ARCH], max_new_tokens_limit=32, max_input_tokens=64),
                               on_exit=gone.set)
    client.start()
    yield client
    client.stop()
    assert not gone.is_set(), "an orderly stop is not an unexpected exit"
    assert client.process.exitcode == 0


def _engine_processes(pid: int) -> list[int]:
    """Child processes of `pid` started by multiprocessing's spawn (not its resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its entry waits to be reaped


def test_remote_outputs_equal_the_in_process_engine(remote, base_dirs, adapter_dirs):
    adapters = dict(list(adapter_dirs(ARCH).items())[:2])
    for name, path in adapters.items():
        remote.add_adapter(name, path)
    requests = [(p, a) for p in PROMPTS for a in (None, *adapters)]
    streams = [remote.submit(greedy_request(remote.encode(p), 10, a)) for p, a in requests]
    got = [collect(s) for s in streams]
    with running_engine(base_dirs[ARCH], "none", adapters) as local:
        for (prompt, adapter), (pieces, finish) in zip(requests, got):
            expected = local.submit(greedy_request(local.encode(prompt), 10, adapter)).result()
            assert finish.token_ids == expected.token_ids and finish.text == expected.text
            assert "".join(p.text for p in pieces) == finish.text
            assert finish.completion_tokens == 10 and finish.adapter == adapter
    assert {e.adapter_id for e in remote.adapters()} >= set(adapters)
    stats = remote.stats()
    assert stats.waiting == 0 and stats.running == 0 and set(adapters) <= set(stats.slots_resident)


def test_refusals_arrive_on_the_stream_with_their_type(remote):
    ids = remote.encode("hello")
    cases = [
        (GenerationRequest(ids, SamplingParams(max_new_tokens=5), adapter="nobody/missing"), AdapterNotFound),
        (GenerationRequest(ids, SamplingParams(max_new_tokens=500)), InvalidArgument),
        (GenerationRequest(ids * 40, SamplingParams(max_new_tokens=5)), InvalidArgument),
        (GenerationRequest(ids, SamplingParams(max_new_tokens=5, temperature=-1.0)), InvalidArgument),
    ]
    for request, error in cases:
        with pytest.raises(error) as info:
            remote.submit(request).result()
        assert "Traceback" not in info.value.message and "/" not in info.value.message.replace("nobody/missing", "")
    # The engine serves on after every refusal.
    assert remote.submit(greedy_request(ids, 3)).result().completion_tokens == 3


def test_check_then_add_reuses_the_check_and_follows_changes(remote, adapter_dirs, tmp_path):
    path = adapter_dirs(ARCH)["mlp-r4"]
    checked = remote.check_adapter("checked", path, keep=True)
    assert checked.rank == 4 and checked.digest.startswith("sha256:") and checked.modules
    entry = remote.add_adapter("checked", path, checked=checked)
    assert entry.digest == checked.digest and remote.has_adapter("checked")
    assert remote.adapter_tier("checked")[0] in ("cpu", "gpu")
    # A check whose weights were dropped meanwhile is read again, and refused if the files are
    # not the ones checked: never served with other weights than were validated.
    stale = remote.check_adapter("stale", adapter_dirs(ARCH)["att-r4"], keep=True)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(path).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(AdapterIncompatible, match="changed on disk"):
        remote.add_adapter("stale", copy, checked=dataclasses.replace(stale, token="expired"))
    assert not remote.has_adapter("stale")
    remote.remove_adapter("checked")
    assert not remote.has_adapter("checked")
    with pytest.raises(AdapterNotFound):
        remote.submit(greedy_request(remote.encode("x"), 2, "checked")).result()
    with pytest.raises(AdapterNotFound):
        remote.remove_adapter("checked")


def test_only_engine_calls_cross_the_pipe(remote):
    """A method outside the engine's call list is refused with an answer, never left waiting."""
    with pytest.raises(EngineFault, match="not an engine call"):
        remote._call("_snapshot")
    assert remote.stats().running == 0  # the engine serves on


def test_cancel_reaches_the_engine(remote):
    stream = remote.submit(greedy_request(remote.encode("a long answer"), 32))
    next(iter(stream))  # running
    remote.cancel(stream)
    finish = stream.result()
    assert finish.finish_reason == "cancelled" and finish.completion_tokens < 32


def test_a_dead_engine_fails_what_waits_on_it(base_dirs):
    gone = threading.Event()
    client = RemoteEngine.load(_config(base_dirs[ARCH]), on_exit=gone.set)
    client.start(warmup=False)
    stream = client.submit(GenerationRequest(client.encode("x"), SamplingParams(max_new_tokens=1000, ignore_eos=True)))
    os.kill(client.process.pid, signal.SIGKILL)
    with pytest.raises(Unavailable, match="engine process stopped"):
        stream.result()
    assert gone.wait(10) and not client.ready
    with pytest.raises(Unavailable):
        client.stats()
    with pytest.raises(Unavailable):
        client.submit(GenerationRequest(client.encode("x")))
    client.stop()  # no hang on a dead process
    assert client.process.exitcode == -signal.SIGKILL


def test_the_engine_process_exits_with_its_server_process(base_dirs, tmp_path):
    """SIGKILL of the server process (no cleanup at all) still ends the engine process."""
    script = ("import sys, time\n"
              "from loraserve.config import BaseModelConfig, EngineConfig\n"
              "from loraserve.engine.remote import RemoteEngine\n"
              f"c = RemoteEngine.load(EngineConfig(base=BaseModelConfig(model={str(base_dirs[ARCH])!r}, "
              "quantization='none')))\n"
              "print(c.process.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[3])
    try:
        engine_pid = int(parent.stdout.readline())
        assert not _exited(engine_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while not _exited(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _exited(engine_pid), "the engine process outlived its server process"
    finally:
        parent.kill()


def test_server_exits_1_when_its_engine_dies(tmp_path, base_dirs, adapter_dirs):
    """A real server: SIGKILL its engine process mid-stream. The stream ends UNAVAILABLE (never a
    hang), health stops saying SERVING, and the server exits 1 for its orchestrator to restart."""
    server = start_server(tmp_path, base_dirs[ARCH], tmp_path / "store", "--quantization", "none",
                          "--max-new-tokens", "2000")
    try:
        server.wait_serving()
        engines = _engine_processes(server.process.pid)
        assert len(engines) == 1, f"one engine process expected, found {engines}"
        stream = server.inference.GenerateStream(ipb.GenerateStreamRequest(input=ipb.GenerationInput(
            prompt="The patient presents with", sampling=ipb.SamplingParams(max_new_tokens=2000))), timeout=60)
        next(stream)  # tokens are flowing (this greedy answer runs to ~350 tokens: over a second)
        os.kill(engines[0], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine process stopped" in info.value.details()
        assert server.process.wait(30) == 1
        assert "the engine process is gone" in server.log()
    finally:
        server.stop()


def _in_session(sid: int) -> list[int]:
    """Live processes of session `sid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def test_a_server_that_fails_to_start_leaves_no_engine_process(tmp_path, base_dirs):
    """`serve` starts its engine process before anything else; a start-up error after that (a
    broken keys file) still ends it."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: [this is: not valid")
    server = subprocess.Popen(
        [sys.executable, "-m", "loraserve", "serve", "--model", str(base_dirs[ARCH]), "--quantization", "none",
         "--adapters-dir", str(tmp_path / "store"), "--api-keys-file", str(keys), "--host", "127.0.0.1",
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=Path(__file__).resolve().parents[3])
    output = server.communicate(timeout=180)[0].decode(errors="replace")
    assert server.returncode != 0 and "keys" in output
    deadline = time.monotonic() + 30
    while _in_session(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _in_session(server.pid) == [], "the engine process outlived a failed start"
