"""`loraserve bench serve`: what the gRPC layer costs. The same mixed-adapter workload is served by
a real `loraserve serve` process, through concurrent GenerateStream calls from one asyncio
client, and by the same engine in this process (no gRPC); tokens/s of the two are compared.

The two never run at the same time (the box has few cores): while one serves a round the other
is idle, holding only memory. Rounds alternate which goes first and the report gives medians,
as in `bench engine`. The server's settings and the in-process engine's come from the same
`serve` flags, and the server inherits this process's environment, so both use the same torch
thread settings (both recorded). The client runs on the same machine as the server, so its CPU
time counts against the gRPC side: it is recorded per round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraserve.client import AsyncLoraserveClient, Generation
from loraserve.config import EngineConfig
from loraserve.devtools.bench.engine_bench import TOPICS, BenchConfig, build_inputs, machine_info
from loraserve.devtools.bench.runs import measure_in, write_result
from loraserve.devtools.server_process import ServerProcess, free_port, server_env
from loraserve.engine.engine_process import engine_threads
from loraserve.engine.native import NativeEngine
from loraserve.engine.request import GenerationRequest, SamplingParams

VARIANTS = ("grpc", "engine")
RATIO_TARGETS: dict[str, tuple[str, str, str, float]] = {
    # name: (numerator variant, denominator variant, comparison, target); medians of tokens/s
    "grpc_over_engine": ("grpc", "engine", ">=", 0.90),
}
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Workload:
    """The requests of one round, identical for both variants: request i is prompts[i] on adapters[i]."""

    prompts: list[str]
    """Sent as text over gRPC (the server tokenizes)."""
    prompt_ids: list[list[int]]
    """The same prompts through the engine's tokenizer, for the in-process engine."""
    adapters: list[str]
    """Round-robin over all adapters."""
    new_tokens: int


@dataclass
class Round:
    """One variant serving the whole workload once; per-request lists are in request order."""

    elapsed_s: float
    """First submit to last finish."""
    token_ids: list[list[int]]
    finish_reasons: list[str]
    first_token_s: list[float]
    """The engine's own timings: arrival in the engine to first token (server side for grpc)."""
    client_ttft_s: list[float] = field(default_factory=list)
    """grpc only: client submit to the first delta carrying tokens."""
    itl_s: list[float] = field(default_factory=list)
    """grpc only: gaps between consecutive token-carrying deltas of one stream."""
    cpu_s: dict[str, float | None] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s


def run_serve_bench(args: argparse.Namespace) -> int:
    """Build a base and adapters, start a server, measure both variants, print the report and write
    the JSON. Exit status 1 if the server does not exit 0 on SIGTERM, else 0 (a missed target is a
    result, not an error)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = BenchConfig.from_args(args)
    started = time.perf_counter()
    engine = getattr(args, "engine", "native")
    measured = measure_in(args.workdir, "serve", lambda root: _measure(config, root, engine,
                                                                       getattr(args, "kv_cache_gib", 2)))
    result = summarize(config, *measured, time.perf_counter() - started)
    print_report(result)
    write_result(args.json_out, result)
    return 0 if result["server"]["exit_code"] == 0 else 1


def serve_flags(config: BenchConfig, base_dir: Path, store: Path, imports: Path, port: int,
                engine: str = "native", kv_cache_gib: int = 2) -> list[str]:
    """The `loraserve serve` flags of the bench's server; the in-process engine is configured from
    the same flags (`engine_config`), so the two cannot drift apart."""
    return ["--engine", engine, "--vllm-cpu-kv-cache-gib", str(kv_cache_gib), "--model", str(base_dir), "--adapters-dir", str(store), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0", "--quantization", config.quantization, "--max-loras", str(config.adapters),
            "--max-cpu-loras", str(max(16, config.adapters)), "--max-lora-rank", str(config.rank),
            "--max-batch-size", str(max(32, config.requests)), "--import-roots", str(imports)]


def server_settings(flags: list[str]):
    """The ServerSettings a server started with `flags` in this environment builds."""
    from loraserve.settings import add_flags, resolve

    parser = argparse.ArgumentParser()
    add_flags(parser)
    return resolve(parser.parse_args(flags))


def engine_config(flags: list[str]) -> EngineConfig:
    """The EngineConfig a server started with `flags` in this environment builds."""
    return server_settings(flags).engine_config()


def in_process_engine(engine: str, flags: list[str]):
    """The engine a server started with `flags` runs, here in this process, started."""
    settings = server_settings(flags)
    if engine == "vllm":
        from loraserve.engine.vllm_engine import VllmEngine

        made = VllmEngine(settings.engine_config(), settings.vllm_options())
        made.wait_loaded()
    else:
        made = NativeEngine.load(settings.engine_config())
    made.start()
    return made


def _measure(config: BenchConfig, root: Path, engine_name: str = "native",
             kv_cache_gib: int = 2) -> tuple[EngineConfig, Workload, dict[str, list[Round]], dict]:
    print(f"building a {config.size} {config.arch} base and {config.adapters} rank-{config.rank} adapters in {root}",
          flush=True)
    base_dir, adapter_dirs = build_inputs(config, root)
    port = free_port()
    flags = serve_flags(config, base_dir, root / "store", root / "adapters", port, engine_name, kv_cache_gib)
    settings = engine_config(flags)
    server = ServerProcess(flags, f"127.0.0.1:{port}", root / "server.log")
    engine = None
    info: dict = {"command": ["python", "-m", "loraserve", "serve", *flags], "engine": engine_name}
    try:
        # The in-process engine loads while the server starts: nothing is measured yet. It
        # uses the torch threads the server's engine process chooses, so the two compare.
        threads = engine_threads(0)
        if threads is not None:
            torch.set_num_threads(threads)
        engine = in_process_engine(engine_name, flags)
        for name, path in adapter_dirs.items():
            engine.add_adapter(name, path)
        info["ready_s"] = server.wait_serving()
        print(f"server SERVING on {server.target} after {info['ready_s']:.1f} s", flush=True)
        workload = make_workload(engine, list(adapter_dirs), config)
        with asyncio.Runner() as runner:  # one event loop for every gRPC round
            client = runner.run(_connect(server.target))
            try:
                for name, path in adapter_dirs.items():
                    runner.run(client.register_adapter(name, str(path)))
                rounds = run_rounds(config, lambda: runner.run(grpc_round(client, workload)),
                                    lambda: engine_round(engine, workload), server)
            finally:
                runner.run(client.close())
    finally:
        if engine is not None:
            engine.stop()
        info["exit_code"] = server.stop()
        if info["exit_code"] != 0:
            print(f"the server exited with status {info['exit_code']} after SIGTERM:\n{server.log_tail()}")
    return settings, workload, rounds, info


async def _connect(target: str) -> AsyncLoraserveClient:
    return AsyncLoraserveClient(target)  # must be created inside the running loop


def make_workload(engine: NativeEngine, adapters: list[str], config: BenchConfig) -> Workload:
    """The engine bench's prompts (12-17 tokens with the synthetic tokenizer), as text."""
    prompts = [f"Story {i} about {TOPICS[i % len(TOPICS)]}" for i in range(config.requests)]
    return Workload(prompts=prompts, prompt_ids=[engine.encode(p) for p in prompts],
                    adapters=[adapters[i % len(adapters)] for i in range(config.requests)],
                    new_tokens=config.new_tokens)


# ---- measurements ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Trace:
    submitted: float
    arrivals: list[float]
    summary: Generation


async def _grpc_stream(client: AsyncLoraserveClient, prompt: str, adapter: str, new_tokens: int) -> _Trace:
    """One greedy GenerateStream read to its summary, with the arrival time of every token delta."""
    submitted = time.perf_counter()
    arrivals, counted, summary = [], 0, None
    async with client.generate_stream(prompt, adapter=adapter, max_new_tokens=new_tokens) as stream:
        async for item in stream:
            if isinstance(item, Generation):
                summary = item
            elif item.token_ids:  # a delta may hold back text (a split character), never tokens
                arrivals.append(time.perf_counter())
                counted += len(item.token_ids)
    if summary is None or counted != summary.completion_tokens:
        raise RuntimeError(f"a stream delivered {counted} tokens in deltas but its summary says "
                           f"{summary.completion_tokens if summary else 'nothing'}")
    return _Trace(submitted, arrivals, summary)


async def grpc_round(client: AsyncLoraserveClient, w: Workload) -> Round:
    """Every request as a concurrent stream; tokens/s from the first submit to the last summary."""
    start = time.perf_counter()
    traces = await asyncio.gather(*(_grpc_stream(client, p, a, w.new_tokens) for p, a in zip(w.prompts, w.adapters)))
    elapsed = time.perf_counter() - start
    return Round(elapsed_s=elapsed, token_ids=[list(t.summary.token_ids) for t in traces],
                 finish_reasons=[t.summary.finish_reason for t in traces],
                 first_token_s=[t.summary.first_token_s for t in traces],
                 client_ttft_s=[t.arrivals[0] - t.submitted for t in traces if t.arrivals],
                 itl_s=[b - a for t in traces for a, b in zip(t.arrivals, t.arrivals[1:])])


def engine_round(engine: NativeEngine, w: Workload) -> Round:
    """Every request submitted at once to the in-process engine and read with `result()`.
    Not engine_bench.engine_throughput: that sets ignore_eos, which a gRPC request cannot ask for,
    and both variants must serve exactly the same requests."""
    sampling = SamplingParams(max_new_tokens=w.new_tokens)
    start = time.perf_counter()
    streams = [engine.submit(GenerationRequest(list(ids), sampling, adapter=a))
               for ids, a in zip(w.prompt_ids, w.adapters)]
    finished = [s.result() for s in streams]
    elapsed = time.perf_counter() - start
    return Round(elapsed_s=elapsed, token_ids=[list(f.token_ids) for f in finished],
                 finish_reasons=[f.finish_reason for f in finished],
                 first_token_s=[f.timings.first_token_s for f in finished])


def run_rounds(config: BenchConfig, grpc: Callable[[], Round], engine: Callable[[], Round],
               server: ServerProcess) -> dict[str, list[Round]]:
    """Warm both variants up once, then `repeats` rounds, alternating which variant goes first.
    Each round records the CPU seconds this process (client or engine) and the server used."""
    variants = {"grpc": grpc, "engine": engine}
    print("warming up (first NF4 forwards repack the weights; adapters enter their slots)", flush=True)
    for run in variants.values():
        run()
    rounds: dict[str, list[Round]] = {name: [] for name in VARIANTS}
    for r in range(config.repeats):
        order = VARIANTS[r % 2:] + VARIANTS[:r % 2]
        for name in order:
            gc.collect()  # not inside the CPU times below
            here, there = time.process_time(), server.cpu_seconds()
            result = variants[name]()
            after = server.cpu_seconds()
            result.cpu_s = {"bench_process": time.process_time() - here,
                            "server_process": None if there is None or after is None else after - there}
            rounds[name].append(result)
            print(f"  round {r + 1}/{config.repeats} {name:<6} {result.tokens_per_s:8.1f} tokens/s "
                  f"({result.tokens} tokens in {result.elapsed_s:.2f} s; CPU s: this process "
                  f"{_cpu(result.cpu_s['bench_process'])}, server {_cpu(result.cpu_s['server_process'])})", flush=True)
    return rounds


# ---- results ---------------------------------------------------------------------------------
def percentiles(samples: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation) and the sample count; None values when under 2 samples."""
    if len(samples) < 2:
        return {**{f"p{p}": (samples[0] if samples else None) for p in PERCENTILES}, "samples": len(samples)}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {**{f"p{p}": cuts[p - 1] for p in PERCENTILES}, "samples": len(samples)}


def torch_threads_in(env: dict[str, str]) -> int:
    """The torch threads a server's engine process gets in `env` (engine_threads left on auto),
    asked of a fresh interpreter in that environment."""
    probe = subprocess.run([sys.executable, "-c", "import torch; from loraserve.engine.engine_process import "
                            "engine_threads; print(engine_threads(0) or torch.get_num_threads())"], env=env,
                           capture_output=True, text=True, check=True)
    return int(probe.stdout.strip())


def summarize(config: BenchConfig, settings: EngineConfig, workload: Workload, rounds: dict[str, list[Round]],
              server: dict, elapsed: float) -> dict:
    """The JSON document: config, machine, per-variant medians and raw rounds, ratio, latencies."""
    variants = {}
    for name in VARIANTS:
        values = [r.tokens_per_s for r in rounds[name]]
        details = [{"tokens": r.tokens, "elapsed_s": r.elapsed_s, "cpu_s": r.cpu_s,
                    "finish_reasons": dict(Counter(r.finish_reasons)), "first_token_s": r.first_token_s,
                    **({"client_ttft_s": r.client_ttft_s, "itl_s": r.itl_s} if name == "grpc" else {})}
                   for r in rounds[name]]
        variants[name] = {"unit": "tokens/s", "median": statistics.median(values), "rounds": values,
                          "round_details": details}
    ratios = {}
    for name, (num, den, op, target) in RATIO_TARGETS.items():
        value = variants[num]["median"] / variants[den]["median"]
        ratios[name] = {"value": value, "target": f"{op} {target:g}",
                        "pass": value >= target if op == ">=" else value <= target}

    def pooled(variant: str, attr: str) -> dict:
        return percentiles([s for r in rounds[variant] for s in getattr(r, attr)])

    latency = {  # every measured round pooled; seconds
        "grpc_ttft_client": pooled("grpc", "client_ttft_s"),
        "grpc_itl_client": pooled("grpc", "itl_s"),
        "grpc_ttft_server": pooled("grpc", "first_token_s"),
        "engine_ttft": pooled("engine", "first_token_s"),
    }
    reference = rounds["engine"][0].token_ids
    differing = sorted({i for r in rounds["grpc"] + rounds["engine"] for i, t in enumerate(r.token_ids)
                        if t != reference[i]})
    lengths = [len(p) for p in workload.prompt_ids]
    env = server_env()
    return {
        "bench": "serve",
        "config": {**asdict(config), "prompt_tokens": [min(lengths), max(lengths)], "greedy": True,
                   "engine_config": asdict(settings)},
        "machine": {**machine_info(), "server_torch_threads": torch_threads_in(env),
                    "omp_num_threads": env.get("OMP_NUM_THREADS"), "mkl_num_threads": env.get("MKL_NUM_THREADS")},
        "server": server,
        "variants": variants,
        "ratios": ratios,
        "latency_s": latency,
        "tokens_agree": {"reference": "engine round 1", "requests": len(reference),
                         "differing_requests": differing},
        "elapsed_s": elapsed,
    }


def print_report(result: dict) -> None:
    """The human-readable table: throughput, the ratio with its target, latency percentiles."""
    c, m = result["config"], result["machine"]
    print(f"\nserve bench ({result['server']['engine']} engine): {c['arch']} {c['size']} {c['quantization']}, {c['requests']} concurrent greedy requests x "
          f"{c['new_tokens']} new tokens (prompts {c['prompt_tokens'][0]}-{c['prompt_tokens'][1]} tokens), "
          f"{c['adapters']} adapters r={c['rank']}, {c['repeats']} rounds")
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch threads: bench {m['torch_threads']}, server "
          f"{m['server_torch_threads']} (OMP_NUM_THREADS={m['omp_num_threads']}), torch {m['torch']}, "
          f"cuda={m['cuda']}" + (f" ({m['gpu']})" if m["gpu"] else ""))
    print(f"\n{'variant':<8} {'median':>14}   rounds (tokens/s)        tokens per round   CPU s per round "
          "(this process / server)")
    for name, v in result["variants"].items():
        rounds = ", ".join(f"{x:.1f}" for x in v["rounds"])
        tokens = ", ".join(str(d["tokens"]) for d in v["round_details"])
        cpu = ", ".join(f"{_cpu(d['cpu_s']['bench_process'])}/{_cpu(d['cpu_s']['server_process'])}"
                        for d in v["round_details"])
        print(f"{name:<8} {v['median']:>8.1f} tok/s   {rounds:<24} {tokens:<18} {cpu}")
    reasons = Counter()
    for v in result["variants"].values():
        for d in v["round_details"]:
            reasons.update(d["finish_reasons"])
    print(f"finish reasons, all rounds: {dict(reasons)}")
    print(f"\n{'ratio':<18} {'value':>7}   {'target':<8} result")
    for name, r in result["ratios"].items():
        print(f"{name:<18} {r['value']:>7.2f}   {r['target']:<8} {'PASS' if r['pass'] else 'MISS'}")
    print(f"\n{'latency (ms, all rounds pooled)':<44} {'p50':>7} {'p90':>7} {'p99':>7}  samples")
    labels = {"grpc_ttft_client": "grpc TTFT, client: submit -> first delta",
              "grpc_itl_client": "grpc inter-token, client: delta gaps",
              "grpc_ttft_server": "grpc TTFT, server engine: arrival -> token",
              "engine_ttft": "engine TTFT, in-process: arrival -> token"}
    for name, p in result["latency_s"].items():
        values = " ".join(f"{p[f'p{q}'] * 1000:>7.1f}" if p[f"p{q}"] is not None else f"{'-':>7}" for q in PERCENTILES)
        print(f"{labels[name]:<44} {values}  {p['samples']}")
    agree = result["tokens_agree"]
    print(f"\ngreedy tokens: {len(agree['differing_requests'])} of {agree['requests']} requests differ in some round "
          "from engine round 1 (info: batch composition can move near-ties)")
    s = result["server"]
    print(f"server: SERVING after {s['ready_s']:.1f} s; exit status after SIGTERM: {s['exit_code']}")
    missed = [name for name, r in result["ratios"].items() if not r["pass"]]
    print(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    print(f"total bench time {result['elapsed_s']:.0f} s")


def _cpu(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f}"
