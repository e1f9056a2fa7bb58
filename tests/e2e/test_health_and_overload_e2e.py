"""What a real server tells its orchestrator and its clients when things go wrong around it: a
stopped engine turns health NOT_SERVING (liveness and readiness kept apart), a busy port stops
the server at once with one line naming it, and more calls than it takes are refused with
RESOURCE_EXHAUSTED and counted, never cancelled in silence."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from loraserve.devtools.server_process import running_server, start_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.engine.contract import Heartbeat
from loraserve.engine.remote import RemoteEngine
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import inference_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("health") / "base", "deepseek-llm", "tiny", seed=41)


def status(srv, service: str) -> int:
    return srv.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(predicate, timeout: float) -> float:
    """Seconds until `predicate()` held (polled every 20 ms); fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


def engine_process(srv) -> psutil.Process:
    children = [c for c in psutil.Process(srv.process.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(children) == 1, [c.cmdline() for c in psutil.Process(srv.process.pid).children()]
    return children[0]


def test_a_stopped_engine_turns_health_not_serving_and_back(base, tmp_path):
    with running_server(tmp_path, base, tmp_path / "store", "--quantization", "none", "--heartbeat-interval",
                        "0.5") as srv:
        for service in ("", "readiness", "liveness", "loraserve.v1.InferenceService"):
            assert status(srv, service) == SERVING
        engine = engine_process(srv)
        engine.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: status(srv, "liveness") == NOT_SERVING, timeout=15)
            assert status(srv, "") == NOT_SERVING and status(srv, "readiness") == NOT_SERVING
            req = ipb.GenerateRequest(input=ipb.GenerationInput(prompt="hi", sampling=ipb.SamplingParams(
                max_new_tokens=2)))
            with pytest.raises(grpc.RpcError) as info:
                srv.inference.Generate(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # refused, not left waiting
        finally:
            engine.send_signal(signal.SIGCONT)
        wait_for(lambda: status(srv, "") == SERVING, timeout=15)
        assert status(srv, "liveness") == SERVING
        assert "engine unhealthy, health NOT_SERVING: the engine process has sent no heartbeat" in srv.log()
        assert "engine healthy again" in srv.log()


def test_draining_is_not_ready_but_alive(base, tmp_path):
    srv = start_server(tmp_path, base, tmp_path / "store", "--quantization", "none", "--drain-timeout", "20")
    try:
        srv.wait_serving()
        stream = srv.inference.GenerateStream(ipb.GenerateStreamRequest(input=ipb.GenerationInput(
            prompt="a long answer", sampling=ipb.SamplingParams(max_new_tokens=2000))), timeout=60)
        next(iter(stream))
        srv.process.send_signal(signal.SIGTERM)
        wait_for(lambda: status(srv, "readiness") == NOT_SERVING, timeout=15)
        assert status(srv, "liveness") == SERVING  # draining is no reason to restart it
        stream.cancel()
    finally:
        assert srv.stop() == 0


def test_engine_health_verdicts():
    """RemoteEngine.health's rules, on the heartbeats it would have received."""
    client = RemoteEngine.__new__(RemoteEngine)  # its judgement only: no process behind it
    client.heartbeat_interval, client.stall_timeout = 1.0, 60.0
    client.gone = threading.Event()
    now = time.monotonic()
    client._last_heartbeat = (now, Heartbeat(since_progress_s=0.2, waiting=3, running=2))
    assert client.health() is None
    client._last_heartbeat = (now - 2.6, Heartbeat(0.2, 0, 0))
    assert "no heartbeat for 2.6s" in client.health()
    client._last_heartbeat = (now, Heartbeat(since_progress_s=61.0, waiting=3, running=2))
    assert "no progress for 61s with 2 requests running and 3 waiting" in client.health()
    client.gone.set()
    assert client.health() == "the engine process has exited"


def _exits_with_one_line(srv, words: str) -> None:
    assert srv.process.wait(60) == 1
    log = srv.log()
    assert words in log, log[-3000:]
    assert "Traceback" not in log and "Errno" not in log, log[-3000:]


@contextlib.contextmanager
def listening(host: str):
    """A port another process listens on (this test's socket), for as long as the block runs."""
    with socket.socket() as holder:
        holder.bind((host, 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_busy_grpc_port_stops_the_server_with_one_line(base, tmp_path):
    with listening("127.0.0.1") as port:
        srv = start_server(tmp_path, base, tmp_path / "store", "--quantization", "none", port=port)
        _exits_with_one_line(srv, f"cannot start: gRPC port {port} is already in use on 127.0.0.1")
    # And beside a running loraserve: gRPC's SO_REUSEPORT would have let it share the port.
    with running_server(tmp_path, base, tmp_path / "store", "--quantization", "none") as first:
        second = start_server(tmp_path, base, tmp_path / "store2", "--quantization", "none", port=first.port)
        _exits_with_one_line(second, f"cannot start: gRPC port {first.port} is already in use")
        assert status(first, "") == SERVING


def test_a_busy_metrics_port_stops_the_server_with_one_line(base, tmp_path):
    with listening("0.0.0.0") as port:
        srv = start_server(tmp_path, base, tmp_path / "store", "--quantization", "none", metrics_port=port)
        _exits_with_one_line(srv, f"cannot start: metrics port {port} is already in use")


def test_more_calls_than_the_server_takes_are_resource_exhausted_and_counted(base, tmp_path):
    # Fewer calls in flight allowed (24) than the engine would take (32 running + 16 queued), each
    # generating long enough to stay in flight: the excess is refused by the server's own bound.
    with running_server(tmp_path, base, tmp_path / "store", "--quantization", "none", "--max-concurrent-rpcs", "24",
                        "--max-queue", "16", "--max-streams-per-connection", "256") as srv:
        async def flood() -> collections.Counter:
            codes: collections.Counter = collections.Counter()
            async with grpc.aio.insecure_channel(srv.target) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)

                async def one() -> None:
                    req = ipb.GenerateStreamRequest(input=ipb.GenerationInput(prompt="hello", sampling=ipb.SamplingParams(
                        max_new_tokens=48)))
                    try:
                        async for _ in stub.GenerateStream(req, timeout=120):
                            pass
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            codes["calls in flight" in exc.details() and "guard" or "queue"] += 1
                await asyncio.gather(*(one() for _ in range(1500)))
            return codes
        codes = asyncio.run(flood())
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "guard", "queue"}, codes
        assert codes["OK"] > 0 and codes["guard"] > 0, codes
        assert status(srv, "") == SERVING
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        refused = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("loraserve_requests_total{") and 'code="RESOURCE_EXHAUSTED"' in line)
        assert refused == codes["RESOURCE_EXHAUSTED"], (refused, codes)


def test_the_front_end_runs_at_front_nice_and_the_engine_process_does_not(base, tmp_path):
    with running_server(tmp_path, base, tmp_path / "store", "--quantization", "none", "--front-nice", "5") as srv:
        front = psutil.Process(srv.process.pid)
        niceness = {int(os.getpriority(os.PRIO_PROCESS, t.id)) for t in front.threads()}  # nice is per thread
        assert niceness == {5} and engine_process(srv).nice() == 0
