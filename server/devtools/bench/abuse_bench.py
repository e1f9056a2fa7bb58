"""`loraserve bench abuse`: what a careless or hostile client costs a real server, measured.

Against one `loraserve serve` on 127.0.0.1 (a synthetic base):
- a 14 MB prompt and 200,000 chat messages: how long until refused, whether health answered
  meanwhile and how long it took, and the front end's RSS before and after;
- three 300 MB uploads at once: the front end's peak RSS over its RSS before;
- 10,000 streams opened at once (one connection, then eight): the status codes they end with;
- the engine process SIGSTOPped: seconds until health reads NOT_SERVING, in heartbeat periods;
and in-process, a NaN and an inf adapter in slots beside healthy ones: tokens changed for every
other request against a clean run of the same batch (`loraserve.devtools.bench.poison`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import statistics
import struct
import threading
import time
from pathlib import Path

from loraserve.devtools.bench.runs import measure_in, write_result

MB = 1_000_000
SETTLE_S = 2.0
"""Seconds before the 'settled' RSS reading: the server gives large messages' memory back within one."""


def run_abuse_bench(args: argparse.Namespace) -> int:
    result = measure_in(args.workdir, "abuse", lambda root: _measure(root, args))
    print(json.dumps(result, indent=2))
    write_result(args.json_out, result)
    return 0


def _measure(root: Path, args: argparse.Namespace) -> dict:
    import psutil

    from loraserve.devtools.server_process import ServerProcess, free_port
    from loraserve.devtools.synthetic_base import init_model

    base = init_model(root / "base", args.arch, args.size, seed=0)
    port = free_port()
    server = ServerProcess(["--model", str(base), "--adapters-dir", str(root / "store"), "--host", "127.0.0.1",
                            "--port", str(port), "--metrics-port", "0", "--quantization", args.quantization,
                            "--heartbeat-interval", str(args.heartbeat_interval),
                            "--max-concurrent-uploads-per-tenant", "3"],  # the three uploads are one tenant's
                           f"127.0.0.1:{port}", root / "server.log")
    try:
        server.wait_serving()
        front = psutil.Process(server.process.pid)
        result = {"machine": _machine(), "base": f"{args.arch}/{args.size}/{args.quantization}",
                  "huge_inputs": _huge_inputs(server.target, front),
                  "uploads": _uploads(server.target, front, args.upload_mb),
                  "streams": {f"{c}_connections": _streams(server.target, args.streams, c) for c in (1, 8)},
                  "sigstop": _sigstop(server, front, args.heartbeat_interval)}
    finally:
        server.kill()
    from loraserve.devtools.bench.poison import changed_tokens

    result["poisoned_slots"] = {q: changed_tokens(base, q) for q in ("nf4", "none")}
    return result


def _machine() -> dict:
    import os
    import platform

    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform()}


def _channel(target: str):
    import grpc

    return grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * MB)])


def _health_while(target: str, work) -> dict:
    """Run `work()` while a thread checks health every 20 ms; health latencies and failures."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    done, latencies, failures = threading.Event(), [], []

    def watch() -> None:
        with _channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                started = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    latencies.append(time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - counted, whatever it is
                    failures.append(type(exc).__name__)
                time.sleep(0.02)
    thread = threading.Thread(target=watch)
    thread.start()
    try:
        out = work()
    finally:
        done.set()
        thread.join()
    return {"result": out, "health_checks": len(latencies), "health_failures": len(failures),
            "health_max_ms": round(1000 * max(latencies, default=0), 1)}


def _huge_inputs(target: str, front) -> dict:
    import grpc

    from loraserve.proto.v1 import inference_pb2 as ipb
    from loraserve.proto.v1 import inference_pb2_grpc

    cases = {"prompt_14MB": ipb.GenerationInput(prompt="a" * (14 * MB)),
             "chat_200k_messages": ipb.GenerationInput(messages=ipb.Messages(
                 messages=[ipb.ChatMessage(role="user", content="hi you")] * 200_000))}
    out = {}
    with _channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for name, given in cases.items():
            request = ipb.GenerateRequest(input=given)
            rss_before = front.memory_info().rss

            def send(request=request) -> dict:
                seconds, codes = [], collections.Counter()
                for _ in range(5):
                    started = time.perf_counter()
                    try:
                        stub.Generate(request, timeout=60)
                        codes["OK"] += 1
                    except grpc.RpcError as exc:
                        codes[exc.code().name] += 1
                    seconds.append(time.perf_counter() - started)
                return {"refused_ms_median": round(1000 * statistics.median(seconds), 1),
                        "refused_ms_max": round(1000 * max(seconds), 1), "codes": dict(codes)}
            with _peak_rss(front) as peak:
                measured = _health_while(target, send)
            measured.update(measured.pop("result"))
            measured["request_mb"] = round(request.ByteSize() / MB, 1)
            measured["front_rss_peak_growth_mb"] = round((peak[0] - rss_before) / MB, 1)
            measured["front_rss_growth_mb"] = round((front.memory_info().rss - rss_before) / MB, 1)
            time.sleep(SETTLE_S)
            measured["front_rss_growth_settled_mb"] = round((front.memory_info().rss - rss_before) / MB, 1)
            out[name] = measured
    return out


@contextlib.contextmanager
def _peak_rss(process):
    """The highest RSS of `process` while the block runs (sampled every 50 ms), in a one-item list."""
    peak, done = [process.memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.05)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def _upload_messages(name: str, size: int):
    """An upload of a well-formed safetensors file of `size` bytes whose one tensor has a dtype
    adapters never have (I64): streamed in full, then refused by the header check."""
    from loraserve.proto.v1 import adapters_pb2 as apb

    count = (size - 256) // 8
    header = json.dumps({"base_model.model.x.lora_A.weight": {"dtype": "I64", "shape": [count],
                                                              "data_offsets": [0, count * 8]}}).encode()
    yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name))
    yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name="adapter_config.json",
                                                       data=b'{"r": 8, "lora_alpha": 16}'))
    yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name="adapter_model.safetensors",
                                                       data=struct.pack("<Q", len(header)) + header))
    zeros, left = bytes(1 << 20), count * 8
    while left > 0:
        yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name="adapter_model.safetensors",
                                                           data=zeros[:min(left, len(zeros))]))
        left -= len(zeros)


def _uploads(target: str, front, size_mb: int) -> dict:
    import grpc

    from loraserve.proto.v1 import adapters_pb2_grpc

    rss_before = front.memory_info().rss
    codes: collections.Counter = collections.Counter()

    def upload(i: int) -> None:
        with _channel(target) as channel:
            try:
                adapters_pb2_grpc.AdapterServiceStub(channel).UploadAdapter(
                    _upload_messages(f"big{i}", size_mb * MB), timeout=600)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    started = time.perf_counter()
    with _peak_rss(front) as peak:
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - started
    after = front.memory_info().rss
    time.sleep(SETTLE_S)
    return {"uploads": 3, "mb_each": size_mb, "seconds": round(seconds, 1), "codes": dict(codes),
            "front_rss_before_mb": round(rss_before / MB, 1), "front_rss_peak_growth_mb": round((peak[0] - rss_before) / MB, 1),
            "front_rss_growth_mb": round((after - rss_before) / MB, 1),
            "front_rss_growth_settled_mb": round((front.memory_info().rss - rss_before) / MB, 1)}


def _streams(target: str, count: int, connections: int) -> dict:
    import grpc

    from loraserve.proto.v1 import inference_pb2 as ipb
    from loraserve.proto.v1 import inference_pb2_grpc

    async def flood() -> dict:
        codes: collections.Counter = collections.Counter()
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(connections)]
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
        request = ipb.GenerateStreamRequest(input=ipb.GenerationInput(prompt="hello there", sampling=ipb.SamplingParams(
            max_new_tokens=2)))

        async def one(i: int) -> None:
            try:
                async for _ in stubs[i % connections].GenerateStream(request, timeout=600):
                    pass
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        for c in channels:
            await c.close()
        return {"streams": count, "seconds": round(time.perf_counter() - started, 1), "codes": dict(codes)}
    return asyncio.run(flood())


def _sigstop(server, front, interval: float, rounds: int = 3) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    engine = next(c for c in front.children() if "spawn_main" in " ".join(c.cmdline()))
    seen = []
    with _channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        for _ in range(rounds):
            started = time.monotonic()
            engine.send_signal(signal.SIGSTOP)
            while status("liveness") == health_pb2.HealthCheckResponse.SERVING and time.monotonic() - started < 60:
                time.sleep(0.01)
            seen.append(time.monotonic() - started)
            engine.send_signal(signal.SIGCONT)
            while status("") != health_pb2.HealthCheckResponse.SERVING:
                time.sleep(0.05)
            time.sleep(interval * 1.5)
    return {"heartbeat_interval_s": interval, "not_serving_after_s": [round(s, 2) for s in seen],
            "not_serving_after_periods_max": round(max(seen) / interval, 2)}


def add_flags(b: argparse.ArgumentParser, archs, sizes, quantizations) -> None:
    from loraserve.devtools.bench.runs import add_base_flags

    add_base_flags(b, archs, sizes, quantizations)
    b.set_defaults(size="tiny")
    b.add_argument("--streams", type=int, default=10_000, help="streams opened at once")
    b.add_argument("--upload-mb", type=int, default=300, help="size of each of the three concurrent uploads")
    b.add_argument("--heartbeat-interval", type=float, default=1.0, help="the server's heartbeat_interval")
    b.add_argument("--workdir", default=None, help="where to build the base (a temp dir when unset)")
