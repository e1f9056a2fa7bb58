"""`loraserve bench scale`: the native engine at realistic load, in this process, on the `small`
deepseek-v3 and deepseek-llm bases in NF4 (each arch one after the other). Every throughput
scenario is measured against its reference side by side, in rounds that alternate the order,
and the report gives medians (tokens/s of 32 requests x 32 new tokens, all submitted at once):

- `max_loras` 32: one adapter, 8 and 32 distinct adapters, each over the base alone;
- 64 adapters through 8 slots: 32 requests on 32 of them (a different half each round, so the
  host cache and slots turn over), over 32 requests on 8 adapters that stay hot; once with the
  host cache sized in bytes (count cap 64), once capped at 16 adapters. Eight slots let at most
  eight of the 32 distinct-adapter requests run at once, so the report also gives the churn
  run over 8 requests on the 8 hot adapters: that batch width's own speed, the run's bound;
- ranks 8/16/32/64 mixed (8 adapters, `max_lora_rank` 64) over 8 rank-16 adapters
  (`max_lora_rank` 16), 32 requests round-robin over the 8 on each;
- TTFT of a short request sent while 8 streams decode and a new 2,000-token prompt has just
  arrived, over its TTFT on the idle engine;
- a 1,000-token system prompt: TTFT of a second request with the same adapter (another
  question), over the first's (the prefix cache), and the hit count.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.bench.engine_bench import (
    TOPICS,
    BenchConfig,
    build_inputs,
    engine_throughput,
    machine_info,
    use_server_threads,
)
from loraserve.devtools.bench.runs import measure_in, write_result
from loraserve.engine.native import NativeEngine
from loraserve.engine.request import GenerationRequest, SamplingParams

REQUESTS, NEW_TOKENS = 32, 32
TARGETS = {"one_over_base_32_slots": (">=", 0.90), "thirtytwo_over_base_32_slots": (">=", 0.75),
           "churn64_over_hot8": (">=", 0.70), "ttft_prefill_over_idle": ("<=", 3.0),
           "prefix_second_over_first": ("<=", 0.3)}


def run_scale_bench(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The torch threads the server's engine process takes (all CPUs but one on a CPU host): the
    # engine runs on a thread of its own there as here, and with more intra-op threads than that
    # a second OpenMP team (the loading thread's) makes its small ops ~10x slower (measured).
    use_server_threads()
    started = time.perf_counter()
    result = {"bench": "scale", "machine": machine_info(), "repeats": args.repeats, "archs": {}}
    for arch in args.archs:
        config = BenchConfig(arch, args.size, args.quantization, REQUESTS, NEW_TOKENS, 64, 16, args.repeats)
        result["archs"][arch] = measure_in(args.workdir, f"scale-{arch}", lambda root: _measure(config, root))
    result["elapsed_s"] = time.perf_counter() - started
    print_report(result)
    write_result(args.json_out, result)
    return 0


def _engine(base_dir: Path, config: BenchConfig, adapters: dict[str, Path], max_lora_rank: int = 16,
            **limits) -> NativeEngine:
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization=config.quantization),
                                            max_batch_size=48, max_lora_rank=max_lora_rank, **limits))
    engine.start()
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def _alternate(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Warm-up, then `repeats` rounds rotating the order; tokens/s per variant per round."""
    for run in variants.values():
        run(-1)
    values: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            values[name].append(variants[name](r))
    return values


def _measure(config: BenchConfig, root: Path) -> dict:
    print(f"building a {config.size} {config.arch} base and 64 rank-16 adapters in {root}", flush=True)
    base_dir, adapters = build_inputs(config, root)
    names = list(adapters)
    out: dict = {}
    engine = _engine(base_dir, config, {n: adapters[n] for n in names[:32]}, max_loras=32, max_cpu_loras=64)
    try:
        prompts = [engine.encode(f"Story {i} about {TOPICS[i % len(TOPICS)]}") for i in range(REQUESTS)]

        def run(mix: list[str | None]):
            return lambda _r: engine_throughput(engine, prompts, mix, NEW_TOKENS)[0]
        forward0, host0 = engine.step_time()
        out["slots32"] = _alternate({"base": run([None] * REQUESTS), "one": run([names[0]] * REQUESTS),
                                     "eight": run([names[i % 8] for i in range(REQUESTS)]),
                                     "thirtytwo": run(names[:REQUESTS])}, config.repeats)
        forward, host = (a - b for a, b in zip(engine.step_time(), (forward0, host0)))
        out["decode_host_share"] = host / (forward + host)
        print(f"  {config.arch} max_loras 32: " + _medians(out["slots32"]) + f"; decode steps {host / (forward + host):.1%} "
              "outside the forward", flush=True)
        out["ttft"] = _ttft(engine, names, config.repeats)
        out["prefix"] = _prefix(engine, names[0], config.repeats)
    finally:
        engine.stop()
    for label, cap in (("bytes", 64), ("cap16", 16)):
        out[f"churn_{label}"] = _churn(_engine(base_dir, config, adapters, max_loras=8, max_cpu_loras=cap), names,
                                       prompts, config.repeats, with_width=label == "bytes")
        print(f"  {config.arch} 64 adapters / 8 slots, host {label}: " + _medians(out[f"churn_{label}"]), flush=True)
    out["ranks"] = _mixed_ranks(base_dir, config, root, prompts)
    print(f"  {config.arch} mixed ranks: " + _medians(out["ranks"]), flush=True)
    out["ratios"] = _ratios(out)
    return out


def _churn(engine: NativeEngine, names: list[str], prompts: list[list[int]], repeats: int, with_width: bool) -> dict:
    """32 requests on 32 of the 64 adapters (a different half each round) against 32 on 8 hot
    ones, and (`with_width`) 8 requests on the 8 hot ones: what eight slots' batch width gives."""
    hot = [names[i % 8] for i in range(REQUESTS)]

    def run(adapters: list[str]):
        return lambda _r: engine_throughput(engine, prompts[:len(adapters)], adapters, NEW_TOKENS)[0]

    def churn(r: int) -> float:
        start = 32 * (r % 2)
        return engine_throughput(engine, prompts, names[start:start + REQUESTS], NEW_TOKENS)[0]
    variants = {"hot8": run(hot), "churn64": churn}
    if with_width:
        variants["width8"] = run(names[:8])
    try:
        out = _alternate(variants, repeats)
        out["disk_loads"] = engine.stats().disk_loads_total
        return out
    finally:
        engine.stop()


RANKS = (8, 16, 32, 64)


def _mixed_ranks(base_dir: Path, config: BenchConfig, root: Path, prompts: list[list[int]]) -> dict:
    """Ranks 8/16/32/64 (two adapters each) on an engine of max_lora_rank 64, against eight
    rank-16 adapters on one of max_lora_rank 16; both engines loaded, rounds alternating."""
    from transformers import AutoModelForCausalLM

    from loraserve.devtools.random_adapters import make_random_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    mixed = {f"rank{r}-{k}": make_random_adapter(base_dir, root / "ranks" / f"rank{r}-{k}", r=r, lora_alpha=2 * r,
                                                 target="all-linear", seed=100 + 10 * r + k, model=model)
             for r in RANKS for k in range(2)}
    del model
    same = {f"bench-{i}": root / "adapters" / f"bench-{i}" for i in range(8)}
    engines = {"mixed": _engine(base_dir, config, mixed, max_loras=8, max_lora_rank=max(RANKS)),
               "rank16": _engine(base_dir, config, same, max_loras=8)}
    try:
        runs = {}
        for label, engine in engines.items():
            names = list(mixed if label == "mixed" else same)
            mix = [names[i % len(names)] for i in range(REQUESTS)]
            runs[label] = lambda _r, e=engine, m=mix: engine_throughput(e, prompts, m, NEW_TOKENS)[0]
        return _alternate(runs, config.repeats)
    finally:
        for engine in engines.values():
            engine.stop()


def _first_token(engine: NativeEngine, ids: list[int], adapter: str | None, n: int = 2) -> float:
    start = time.perf_counter()
    stream = engine.submit(GenerationRequest(list(ids), SamplingParams(max_new_tokens=n, ignore_eos=True),
                                             adapter=adapter))
    next(iter(stream))
    seconds = time.perf_counter() - start
    stream.result()
    return seconds


def _ttft(engine: NativeEngine, names: list[str], repeats: int) -> dict:
    serial = itertools.count()

    def short() -> list[int]:  # a new one each time: no cached prefix helps either side
        return engine.encode(f"{next(serial)} quick question: what time is it?")
    idle, busy = [], []
    for r in range(repeats):
        idle += [_first_token(engine, short(), names[0]) for _ in range(3)]
        words = " ".join(f"{r}-{j} {TOPICS[(r + j) % len(TOPICS)]}" for j in range(900))
        long_ids = engine.encode(words)[:2000]
        sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)
        streams = [engine.submit(GenerationRequest(engine.encode(f"Long answer {i}"), sampling, adapter=names[i]))
                   for i in range(8)]
        for stream in streams:
            next(iter(stream))  # every one is decoding
        long_stream = engine.submit(GenerationRequest(long_ids, SamplingParams(max_new_tokens=1)))
        time.sleep(0.02)
        busy.append(_first_token(engine, short(), names[0]))
        long_stream.result()
        for stream in streams:
            stream.result()
    return {"idle_s": idle, "busy_s": busy, "long_prompt_tokens": 2000}


def _prefix(engine: NativeEngine, adapter: str, repeats: int) -> dict:
    first, second = [], []
    for r in range(repeats + 1):
        system = engine.encode(" ".join(f"rule {r}.{j}: be brief about {TOPICS[j % len(TOPICS)]}" for j in range(160)))
        system = system[:1000]
        questions = [engine.encode(f"Question {q}: what about the moon?")[1:] for q in range(2)]
        before = engine.stats().prefix_cache_hits_total
        t1 = _first_token(engine, system + questions[0], adapter)
        t2 = _first_token(engine, system + questions[1], adapter)
        hits = engine.stats().prefix_cache_hits_total - before
        if r > 0:  # the first is a warm-up
            first.append(t1)
            second.append(t2)
    return {"first_s": first, "second_s": second, "system_tokens": 1000, "hits_last_round": hits}


def _ratios(out: dict) -> dict:
    m = {k: statistics.median(v) for k, v in out["slots32"].items()}
    values = {"one_over_base_32_slots": m["one"] / m["base"], "eight_over_base_32_slots": m["eight"] / m["base"],
              "thirtytwo_over_base_32_slots": m["thirtytwo"] / m["base"],
              "churn64_over_hot8": statistics.median(out["churn_bytes"]["churn64"])
              / statistics.median(out["churn_bytes"]["hot8"]),
              "churn64_over_hot8_cap16": statistics.median(out["churn_cap16"]["churn64"])
              / statistics.median(out["churn_cap16"]["hot8"]),
              "width8_over_hot8": statistics.median(out["churn_bytes"]["width8"])
              / statistics.median(out["churn_bytes"]["hot8"]),
              "churn64_over_width8": statistics.median(out["churn_bytes"]["churn64"])
              / statistics.median(out["churn_bytes"]["width8"]),
              "mixed_ranks_over_rank16": statistics.median(out["ranks"]["mixed"])
              / statistics.median(out["ranks"]["rank16"]),
              "ttft_prefill_over_idle": statistics.median(out["ttft"]["busy_s"]) / statistics.median(out["ttft"]["idle_s"]),
              "prefix_second_over_first": statistics.median(out["prefix"]["second_s"])
              / statistics.median(out["prefix"]["first_s"])}
    ratios = {}
    for name, value in values.items():
        op, target = TARGETS.get(name, (None, None))
        ratios[name] = {"value": value, "target": f"{op} {target}" if op else None,
                        "pass": None if op is None else (value >= target if op == ">=" else value <= target)}
    return ratios


def _medians(values: dict) -> str:
    return ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in values.items() if isinstance(v, list))


def print_report(result: dict) -> None:
    m = result["machine"]
    print(f"\nscale bench: native engine, small bases in NF4, {REQUESTS} requests x {NEW_TOKENS} tokens, "
          f"{result['repeats']} rounds; {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}")
    for arch, out in result["archs"].items():
        print(f"\n{arch}: tokens/s medians  max_loras 32: {_medians(out['slots32'])}; 64 adapters / 8 slots: host "
              f"bytes {_medians(out['churn_bytes'])} ({out['churn_bytes']['disk_loads']} disk loads), cap 16 "
              f"{_medians(out['churn_cap16'])} ({out['churn_cap16']['disk_loads']} disk loads); ranks: "
              f"{_medians(out['ranks'])}")
        print(f"  share of decode-step time outside the model's forward: {out['decode_host_share']:.1%}")
        t, p = out["ttft"], out["prefix"]
        print(f"  TTFT idle {statistics.median(t['idle_s']) * 1000:.0f} ms, under a 2,000-token prefill "
              f"{statistics.median(t['busy_s']) * 1000:.0f} ms; 1,000-token system prompt: first "
              f"{statistics.median(p['first_s']) * 1000:.0f} ms, second {statistics.median(p['second_s']) * 1000:.0f} ms "
              f"({p['hits_last_round']} hit)")
        for name, r in out["ratios"].items():
            verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "MISS")
            print(f"  {name:<32} {r['value']:>6.2f}   {r['target'] or '(info)'} {verdict}")
    print(f"\ntotal bench time {result['elapsed_s']:.0f} s")
