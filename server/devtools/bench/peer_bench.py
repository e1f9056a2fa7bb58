"""`loraserve bench peer`: one workload through loraserve with the vLLM engine (gRPC), vLLM's own
OpenAI-compatible server (HTTP, model = adapter name) and loraserve with the native engine
(gRPC), in one run (`peer_targets`). All three run at once, each idle while another is measured;
every round measures them one after another, rotating which goes first, and the report gives
medians and the ratios:

- throughput (output tokens/s, first send to last token) of `requests` concurrent greedy
  streams: on the base, all on one adapter, and round-robin over every adapter;
- TTFT (client: send -> first token) of a short request on an idle server, and of the same
  request sent while 8 streams decode and a ~2,000-token prompt has just arrived (a new
  prompt each time, so no prefix cache helps).

Targets: loraserve-vllm over vllm-openai >= 0.95 in each throughput (the front costs under 5%),
and TTFT under the long prefill <= 3x idle. A missed target is a result, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraserve.devtools.bench.engine_bench import TOPICS, BenchConfig, build_inputs, machine_info
from loraserve.devtools.bench.peer_targets import TARGETS, GrpcTarget, Limits, Trace, VllmOpenAITarget, vllm_version
from loraserve.devtools.bench.runs import measure_in, write_result

MIXES = ("base", "one", "mixed")
BUSY_STREAMS = 8
BUSY_NEW_TOKENS = 96
LONG_PROMPT_TOKENS = 2000
TTFT_IDLE_SAMPLES = 5
TTFT_BUSY_SAMPLES = 3
THROUGHPUT_TARGET = 0.95
TTFT_TARGET = 3.0


@dataclass(frozen=True)
class PeerWorkload:
    prompts: list[str]
    adapters: dict[str, list[str]]
    """mix -> adapter per request ('' = the base)."""
    new_tokens: int
    short_prompt: str
    long_prompts: list[str]
    """TTFT_BUSY_SAMPLES per round, new each round (each server has its own prefix cache)."""


def run_peer_bench(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = BenchConfig.from_args(args)
    started = time.perf_counter()
    result = measure_in(args.workdir, "peer", lambda root: _measure(config, root, args.kv_cache_gib,
                                                                     args.long_prefill_token_threshold, args.base))
    result["elapsed_s"] = time.perf_counter() - started
    print_report(result)
    write_result(args.json_out, result)
    return 0 if all(code == 0 for code in result["exit_codes"].values()) else 1


def _measure(config: BenchConfig, root: Path, kv_cache_gib: int, long_prefill_token_threshold: int,
             base: str | None = None) -> dict:
    import torch

    from loraserve.base.tokenizer import load_tokenizer

    print(f"building {'a ' + config.size + ' ' + config.arch + ' base and ' if base is None else ''}"
          f"{config.adapters} rank-{config.rank} adapters in {root}", flush=True)
    base_dir, adapter_dirs = build_inputs(config, root) if base is None else (Path(base), build_adapters(base, root,
                                                                                                        config))
    limits = Limits(max_loras=config.adapters, max_cpu_loras=max(16, config.adapters),
                    max_lora_rank=max(16, config.rank), max_num_seqs=max(32, config.requests + BUSY_STREAMS + 2),
                    max_model_len=4096, kv_cache_gib=kv_cache_gib,
                    long_prefill_token_threshold=long_prefill_token_threshold)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    workload = make_workload(load_tokenizer(base_dir), list(adapter_dirs), config)
    targets = [GrpcTarget("loraserve-vllm", "vllm", base_dir, root, limits, adapter_dirs),
               VllmOpenAITarget(base_dir, root, limits, adapter_dirs, dtype),
               GrpcTarget("loraserve-native", "native", base_dir, root, limits, adapter_dirs)]
    result: dict = {"bench": "peer", "config": {**asdict(config), "limits": asdict(limits), "dtype": dtype,
                                                "busy_streams": BUSY_STREAMS, "long_prompt_tokens": LONG_PROMPT_TOKENS},
                    "machine": {**machine_info(), "vllm": vllm_version()},
                    "commands": {t.name: t.command for t in targets}, "exit_codes": {}}
    try:
        result["ready_s"] = {t.name: t.wait_ready() for t in targets}  # they load side by side
        print("ready: " + ", ".join(f"{n} {s:.0f} s" for n, s in result["ready_s"].items()), flush=True)
        with asyncio.Runner() as runner:
            for target in targets:
                runner.run(target.connect())
            try:
                result["rounds"] = run_rounds(runner, targets, workload, config.repeats)
            finally:
                for target in targets:
                    runner.run(target.close())
    finally:
        for target in targets:
            result["exit_codes"][target.name] = target.stop()
    result.update(summarize(result["rounds"]))
    return result


def build_adapters(base: str, root: Path, config: BenchConfig) -> dict[str, Path]:
    """Random all-linear adapters for an existing base (a real checkpoint, or benchmarks/gpu's
    7B-shaped one), made on the GPU when there is one (bf16), else on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraserve.devtools.random_adapters import make_random_adapter

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map="cuda" if cuda else None)
    made = {f"bench-{i}": make_random_adapter(base, root / "adapters" / f"bench-{i}", r=config.rank,
                                              lora_alpha=2 * config.rank, target="all-linear", seed=i, model=model)
            for i in range(config.adapters)}
    del model
    if cuda:
        torch.cuda.empty_cache()
    return made


def make_workload(tokenizer, adapters: list[str], config: BenchConfig) -> PeerWorkload:
    prompts = [f"Story {i} about {TOPICS[i % len(TOPICS)]}" for i in range(config.requests)]
    mixes = {"base": [""] * config.requests, "one": [adapters[0]] * config.requests,
             "mixed": [adapters[i % len(adapters)] for i in range(config.requests)]}
    long_prompts = []
    for i in range((config.repeats + 1) * TTFT_BUSY_SAMPLES):  # + the warm-up round
        words, text = [], ""
        while len(tokenizer(text).input_ids) < LONG_PROMPT_TOKENS:
            words.extend(f"{i}-{j} {TOPICS[(i + j) % len(TOPICS)]}" for j in range(len(words), len(words) + 50))
            text = " ".join(words)
        long_prompts.append(text)
    return PeerWorkload(prompts, mixes, config.new_tokens, "Quick question: what time is it?", long_prompts)


# ---- one target, one measurement --------------------------------------------------------------
async def throughput(target, w: PeerWorkload, mix: str) -> dict:
    start = time.perf_counter()
    traces = await asyncio.gather(*(target.stream(p, a, w.new_tokens) for p, a in zip(w.prompts, w.adapters[mix])))
    elapsed = max(t.arrivals[-1] for t in traces if t.arrivals) - start
    tokens = sum(t.output_tokens for t in traces)
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "elapsed_s": elapsed,
            "prompt_tokens": sum(t.prompt_tokens for t in traces)}


def _ttft(trace: Trace) -> float:
    return trace.arrivals[0] - trace.submitted


async def ttft_idle(target, w: PeerWorkload) -> list[float]:
    return [_ttft(await target.stream(w.short_prompt, "", 2)) for _ in range(TTFT_IDLE_SAMPLES)]


async def ttft_under_prefill(target, w: PeerWorkload, long_prompts: list[str]) -> list[float]:
    """Per sample: 8 streams decoding, then a new long prompt, then the short request."""
    samples = []
    for long_prompt in long_prompts:
        started = [asyncio.Event() for _ in range(BUSY_STREAMS)]
        busy_tasks = [asyncio.create_task(target.stream(f"Long answer {i} about {TOPICS[-1 - i]}",
                                                        w.adapters["mixed"][i], BUSY_NEW_TOKENS, started[i]))
                      for i in range(BUSY_STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 600)
        await asyncio.sleep(0.05)  # the busy streams are decoding
        long_task = asyncio.create_task(target.stream(long_prompt, "", 1))
        await asyncio.sleep(0.02)  # the long prompt reaches the server first
        samples.append(_ttft(await target.stream(w.short_prompt, "", 2)))
        await asyncio.gather(long_task, *busy_tasks)
    return samples


def run_rounds(runner: asyncio.Runner, targets: list, w: PeerWorkload, repeats: int) -> dict:
    """One warm-up round (not kept), then `repeats` rounds rotating the order of the targets."""
    rounds: dict[str, list[dict]] = {t.name: [] for t in targets}
    for r in range(repeats + 1):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        label = "warm-up" if r == 0 else f"round {r}/{repeats}"
        for target in order:
            cpu_before = target.cpu_seconds()
            measured = {mix: runner.run(throughput(target, w, mix)) for mix in MIXES}
            measured["ttft_idle_s"] = runner.run(ttft_idle(target, w))
            measured["ttft_under_prefill_s"] = runner.run(
                ttft_under_prefill(target, w, w.long_prompts[r * TTFT_BUSY_SAMPLES:(r + 1) * TTFT_BUSY_SAMPLES]))
            cpu_after = target.cpu_seconds()
            measured["server_cpu_s"] = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
            print(f"  {label} {target.name:<17} " + "  ".join(f"{m} {measured[m]['tokens_per_s']:.0f}" for m in MIXES)
                  + f" tok/s; TTFT idle {statistics.median(measured['ttft_idle_s']) * 1000:.0f} ms, under prefill "
                  f"{statistics.median(measured['ttft_under_prefill_s']) * 1000:.0f} ms", flush=True)
            if r > 0:
                rounds[target.name].append(measured)
    return rounds


# ---- results ---------------------------------------------------------------------------------
def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(rounds: dict[str, list[dict]]) -> dict:
    medians: dict[str, dict] = {}
    for name in TARGETS:
        measured = rounds[name]
        idle = [s for m in measured for s in m["ttft_idle_s"]]
        busy = [s for m in measured for s in m["ttft_under_prefill_s"]]
        medians[name] = {**{f"{mix}_tokens_per_s": statistics.median(m[mix]["tokens_per_s"] for m in measured)
                            for mix in MIXES},
                         "ttft_idle_p50_s": _quantile(idle, 0.5), "ttft_idle_p99_s": _quantile(idle, 0.99),
                         "ttft_under_prefill_p50_s": _quantile(busy, 0.5),
                         "ttft_under_prefill_p99_s": _quantile(busy, 0.99)}
    ratios = {}
    for mix in MIXES:
        for name, target in (("loraserve-vllm", THROUGHPUT_TARGET), ("loraserve-native", None)):
            value = medians[name][f"{mix}_tokens_per_s"] / medians["vllm-openai"][f"{mix}_tokens_per_s"]
            ratios[f"{name}_over_vllm-openai_{mix}"] = {
                "value": value, "target": f">= {target}" if target else None,
                "pass": value >= target if target else None}
    for name in TARGETS:
        value = medians[name]["ttft_under_prefill_p50_s"] / medians[name]["ttft_idle_p50_s"]
        ratios[f"{name}_ttft_under_prefill_over_idle"] = {"value": value, "target": f"<= {TTFT_TARGET}",
                                                           "pass": value <= TTFT_TARGET}
    return {"medians": medians, "ratios": ratios}


def print_report(result: dict) -> None:
    c, m = result["config"], result["machine"]
    print(f"\npeer bench: {c['arch']} {c['size']} {c['dtype']} (no quantization), {c['requests']} concurrent greedy "
          f"requests x {c['new_tokens']} new tokens, {c['adapters']} adapters r={c['rank']}, {c['repeats']} rounds")
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['vllm']}, cuda={m['cuda']}"
          + (f" ({m['gpu']})" if m["gpu"] else ""))
    print(f"\n{'server':<18} {'base':>8} {'one':>8} {'mixed':>8}  tok/s   TTFT idle p50/p99     under prefill p50/p99")
    for name, v in result["medians"].items():
        print(f"{name:<18} {v['base_tokens_per_s']:>8.1f} {v['one_tokens_per_s']:>8.1f} {v['mixed_tokens_per_s']:>8.1f}"
              f"         {v['ttft_idle_p50_s'] * 1000:>6.0f} / {v['ttft_idle_p99_s'] * 1000:<6.0f} ms   "
              f"{v['ttft_under_prefill_p50_s'] * 1000:>6.0f} / {v['ttft_under_prefill_p99_s'] * 1000:<6.0f} ms")
    print(f"\n{'ratio':<50} {'value':>7}   target")
    for name, r in result["ratios"].items():
        verdict = "" if r["pass"] is None else ("PASS" if r["pass"] else "MISS")
        print(f"{name:<50} {r['value']:>7.2f}   {r['target'] or '(info)'} {verdict}")
    print(f"\nexit codes after SIGTERM: {result['exit_codes']}; total bench time {result['elapsed_s']:.0f} s")
