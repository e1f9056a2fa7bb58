"""`loraserve bench engine`: the multi-LoRA engine against itself (one adapter, no adapter) and
against PEFT, on one synthetic quantized base, in one process.

Every round runs each variant once, in an order rotated from round to round, and the report
gives medians: the machine is noisy, and alternating spreads a slow spell over all variants
instead of letting it land on one. Each ratio is taken between medians of the same run, never
against numbers from another run or machine. Targets are printed beside the ratios; a missed
target is reported as MISS, never tuned away.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.bench.peft_baseline import NEAR_TIE_GAP, PeftBaseline, first_differences
from loraserve.devtools.bench.runs import measure_in, write_result
from loraserve.engine.engine_process import engine_threads
from loraserve.engine.native import NativeEngine
from loraserve.engine.request import GenerationRequest, RequestStream, SamplingParams
from loraserve.errors import ConfigError

# The busy-engine TTFT scenario: long mixed-adapter requests decode while short ones arrive.
BUSY_REQUESTS = 8
BUSY_NEW_TOKENS = 128
BUSY_WARM_TOKENS = 5
"""Tokens every long request must have streamed before the first short request is sent (>= 4:
the decode-step time is measured between them)."""
TTFT_SAMPLES = 5
"""Short requests per round, on the idle and on the busy engine each (sent one after another)."""
SHORT_NEW_TOKENS = 4

THROUGHPUT_VARIANTS = ("engine_mixed", "engine_single", "engine_base", "peft_sequential", "peft_mixed")
TTFT_VARIANTS = ("ttft_idle", "ttft_busy")
RATIO_TARGETS: dict[str, tuple[str, str, str, float]] = {
    # name: (numerator variant, denominator variant, comparison, target); all medians
    "mixed_over_single": ("engine_mixed", "engine_single", ">=", 0.95),
    "mixed_over_base": ("engine_mixed", "engine_base", ">=", 0.85),
    "speedup_vs_peft_sequential": ("engine_mixed", "peft_sequential", ">=", 8.0),
    "speedup_vs_peft_mixed": ("engine_mixed", "peft_mixed", ">=", 1.8),
    "ttft_busy_over_idle": ("ttft_busy", "ttft_idle", "<=", 3.0),
}
TOPICS = ("the sea", "a red fox", "old maps", "rain in spring", "a quiet train", "green tea", "a lost key",
          "the moon", "city lights", "a paper boat", "winter bread", "a tall tree", "river stones",
          "a small robot", "morning fog", "a brass bell")


@dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures; every field is written to the JSON as is."""

    arch: str
    size: str
    quantization: str
    requests: int
    new_tokens: int
    adapters: int
    rank: int
    repeats: int

    def __post_init__(self) -> None:
        for name in ("requests", "new_tokens", "adapters", "rank", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        return cls(args.arch, args.size, args.quantization, args.requests, args.new_tokens, args.adapters,
                   args.rank, args.repeats)


@dataclass(frozen=True)
class Workload:
    """Token ids and adapter choices shared by every variant, so they serve identical requests."""

    prompts: list[list[int]]
    mixed: list[str]
    """Adapter per request, round-robin over all adapters."""
    single: list[str]
    new_tokens: int
    short_prompt: list[int]
    busy_prompts: list[list[int]]
    busy_adapters: list[str]


@dataclass
class Measurements:
    """Raw values, appended round by round: tokens/s per round for throughput variants, a list of
    first-token seconds per round for TTFT; generated tokens per round for the correctness check."""

    values: dict[str, list] = field(default_factory=dict)
    tokens: dict[str, list[list[list[int]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    correctness: dict = field(default_factory=dict)

    def add(self, variant: str, value: float | list[float], tokens: list[list[int]] | None = None) -> None:
        self.values.setdefault(variant, []).append(value)
        if tokens is not None:
            self.tokens.setdefault(variant, []).append(tokens)


def run_engine_bench(args: argparse.Namespace) -> int:
    """Build a base and adapters, measure every variant, print the report and write the JSON.
    Exit status 1 if the engine's greedy tokens differ from PEFT's other than at a near-tie, else 0
    (a missed speed target is a result, not an error)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight load would bury the report
    # The engine as the server's engine process runs it: its torch threads (all CPUs but one on a
    # CPU host), loaded and served on one thread (see NativeEngine.load); PEFT, in this process,
    # gets the same threads. (Before, with torch's 2 threads here and the engine on another
    # thread than the loading one, both sides ran 2.1-2.3x slower than this, measured 2026-12-02.)
    use_server_threads()
    config = BenchConfig.from_args(args)
    started = time.perf_counter()
    measured, workload = measure_in(args.workdir, "engine", lambda root: _measure(config, root))
    result = summarize(config, workload, measured, time.perf_counter() - started)
    print_report(result)
    write_result(args.json_out, result)
    return 1 if result["correctness"]["unexplained_mismatches"] else 0


def use_server_threads() -> None:
    """Take the torch threads the server's engine process takes (see engine_threads)."""
    threads = engine_threads(0)
    if threads is not None:
        torch.set_num_threads(threads)


def _measure(config: BenchConfig, root: Path) -> tuple[Measurements, Workload]:
    print(f"building a {config.size} {config.arch} base and {config.adapters} rank-{config.rank} adapters in {root}",
          flush=True)
    base_dir, adapter_dirs = build_inputs(config, root)
    base = BaseModelConfig(model=str(base_dir), quantization=config.quantization)
    engine = NativeEngine.load(EngineConfig(
        base=base, max_loras=config.adapters, max_cpu_loras=max(16, config.adapters), max_lora_rank=config.rank,
        max_batch_size=max(32, config.requests, BUSY_REQUESTS + 1)), on_own_thread=True)
    engine.start()
    try:
        for name, path in adapter_dirs.items():
            engine.add_adapter(name, path)
        peft = PeftBaseline.load(base, adapter_dirs)
        workload = make_workload(engine, list(adapter_dirs), config)
        measured = run_rounds(config, engine, peft, workload)
        measured.correctness = correctness(workload, measured, peft)
        return measured, workload
    finally:
        engine.stop()


def build_inputs(config: BenchConfig, root: Path) -> tuple[Path, dict[str, Path]]:
    """Write the synthetic base and `adapters` random rank-`rank` adapters (all-linear preset)."""
    from transformers import AutoModelForCausalLM

    from loraserve.devtools.random_adapters import make_random_adapter
    from loraserve.devtools.synthetic_base import init_model

    base_dir = init_model(root / "base", config.arch, config.size, seed=0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # shared by every adapter
    adapters = {}
    for i in range(config.adapters):
        name = f"bench-{i}"
        adapters[name] = make_random_adapter(base_dir, root / "adapters" / name, r=config.rank,
                                             lora_alpha=2 * config.rank, target="all-linear", seed=i, model=model)
    return base_dir, adapters


def make_workload(engine: NativeEngine, adapters: list[str], config: BenchConfig) -> Workload:
    """Distinct short prompts: 12-17 tokens with the synthetic tokenizer (BOS included)."""
    prompts = [engine.encode(f"Story {i} about {TOPICS[i % len(TOPICS)]}") for i in range(config.requests)]
    busy = [engine.encode(f"Long answer {i} about {TOPICS[-1 - i % len(TOPICS)]}") for i in range(BUSY_REQUESTS)]
    return Workload(
        prompts=prompts, mixed=[adapters[i % len(adapters)] for i in range(config.requests)],
        single=[adapters[0]] * config.requests, new_tokens=config.new_tokens,
        short_prompt=engine.encode("Quick question: what time is it?"),
        busy_prompts=busy, busy_adapters=[adapters[i % len(adapters)] for i in range(BUSY_REQUESTS)])


# ---- measurements ----------------------------------------------------------------------------
def engine_throughput(engine: NativeEngine, prompts: list[list[int]], adapters: list[str | None],
                      new_tokens: int) -> tuple[float, list[list[int]]]:
    """Submit every request at once; tokens/s from the first submit to the last finish."""
    gc.collect()
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    streams = [engine.submit(GenerationRequest(list(p), sampling, adapter=a)) for p, a in zip(prompts, adapters)]
    finished = [s.result() for s in streams]
    elapsed = time.perf_counter() - start
    for f in finished:
        if f.completion_tokens != new_tokens:
            raise RuntimeError(f"the engine generated {f.completion_tokens} tokens ({f.finish_reason}), "
                               f"expected {new_tokens}")
    return len(prompts) * new_tokens / elapsed, [f.token_ids for f in finished]


def peft_throughput(generate: Callable[[list[list[int]], list[str], int], list[list[int]]],
                    prompts: list[list[int]], adapters: list[str], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens/s of one PEFT serving call over the whole workload."""
    gc.collect()
    start = time.perf_counter()
    tokens = generate(prompts, adapters, new_tokens)
    return len(prompts) * new_tokens / (time.perf_counter() - start), tokens


def first_token_seconds(engine: NativeEngine, prompt: list[int], adapter: str | None, delay: float = 0.0) -> float:
    """Seconds from submit to the first TokenEvent of a short request sent after `delay` seconds;
    reads it to the end."""
    time.sleep(delay)
    request = GenerationRequest(list(prompt), SamplingParams(max_new_tokens=SHORT_NEW_TOKENS, ignore_eos=True),
                                adapter=adapter)
    start = time.perf_counter()
    stream = engine.submit(request)
    next(iter(stream))  # a TokenEvent: max_new_tokens >= 1, and an error raises
    seconds = time.perf_counter() - start
    stream.result()
    return seconds


def ttft_round(engine: NativeEngine, workload: Workload, rng: random.Random) -> tuple[list[float], list[float], bool]:
    """TTFT samples of the same short request on the idle engine, then while BUSY_REQUESTS long
    requests decode. The third value says whether every long request was still running when the
    last busy sample got its first token (else the engine was not busy throughout).

    Each sample waits a random fraction of one decode step first: a request sent the moment the
    previous one's events arrive lands at a step boundary and would never wait for a step in flight."""
    adapter = workload.mixed[0]
    sampling = SamplingParams(max_new_tokens=BUSY_NEW_TOKENS, ignore_eos=True)
    requests = [GenerationRequest(list(p), sampling, adapter=a)
                for p, a in zip(workload.busy_prompts, workload.busy_adapters)]
    streams: list[RequestStream] = [engine.submit(r) for r in requests]
    # The first stream is read live: its tokens arrive at decode-step boundaries, which gives the
    # step time (the median interval after token 1: the engine may admit the long requests in
    # two waves, so token 0 and 1 can be apart by several prefills). The others' events queue up.
    arrivals = []
    for i, stream in enumerate(streams):
        events = iter(stream)
        for _ in range(BUSY_WARM_TOKENS):
            next(events)
            if i == 0:
                arrivals.append(time.perf_counter())
    step = statistics.median(b - a for a, b in itertools.pairwise(arrivals[1:]))
    busy = [first_token_seconds(engine, workload.short_prompt, adapter, rng.uniform(0, step))
            for _ in range(TTFT_SAMPLES)]
    last_sample = time.monotonic()
    ends = [r.arrival + s.result().timings.total_s for r, s in zip(requests, streams)]
    idle = [first_token_seconds(engine, workload.short_prompt, adapter, rng.uniform(0, step))
            for _ in range(TTFT_SAMPLES)]
    return idle, busy, min(ends) > last_sample


def run_rounds(config: BenchConfig, engine: NativeEngine, peft: PeftBaseline, workload: Workload) -> Measurements:
    """Warm every variant up once, then `repeats` rounds of every variant in rotated order."""
    w, n = workload, workload.new_tokens
    base_only: list[str | None] = [None] * len(w.prompts)
    throughput: dict[str, Callable[[], tuple[float, list[list[int]]]]] = {
        "engine_mixed": lambda: engine_throughput(engine, w.prompts, w.mixed, n),
        "engine_single": lambda: engine_throughput(engine, w.prompts, w.single, n),
        "engine_base": lambda: engine_throughput(engine, w.prompts, base_only, n),
        "peft_sequential": lambda: peft_throughput(peft.generate_sequential, w.prompts, w.mixed, n),
        "peft_mixed": lambda: peft_throughput(peft.generate_mixed, w.prompts, w.mixed, n),
    }
    print("warming up (the first NF4 forward on CPU repacks the weights)", flush=True)
    for name, run in throughput.items():
        if name == "peft_sequential":  # its first request exercises the same path; all would take long
            peft_throughput(peft.generate_sequential, w.prompts[:1], w.mixed[:1], n)
        else:
            run()
    first_token_seconds(engine, w.short_prompt, w.mixed[0])

    measured = Measurements()
    steps = list(throughput) + ["ttft"]
    for r in range(config.repeats):
        order = steps[r % len(steps):] + steps[:r % len(steps)]
        for step in order:
            if step == "ttft":
                idle, busy, held = ttft_round(engine, w, random.Random(r))
                measured.add("ttft_idle", idle)
                measured.add("ttft_busy", busy)
                if not held:
                    measured.notes.append(f"round {r + 1}: a long request finished before the last busy TTFT "
                                          "sample; the engine was not busy throughout")
                print(f"  round {r + 1}/{config.repeats} ttft idle {_ms(idle)}, busy {_ms(busy)}", flush=True)
                continue
            value, tokens = throughput[step]()
            measured.add(step, value, tokens)
            print(f"  round {r + 1}/{config.repeats} {step:<16} {value:8.1f} tokens/s", flush=True)
    return measured


# ---- results ---------------------------------------------------------------------------------
def summarize(config: BenchConfig, workload: Workload, measured: Measurements, elapsed: float) -> dict:
    """The JSON document: config, machine, per-variant medians and rounds, ratios, correctness."""
    variants = {}
    for name in THROUGHPUT_VARIANTS:
        rounds = measured.values[name]
        variants[name] = {"unit": "tokens/s", "median": statistics.median(rounds), "rounds": rounds}
    for name in TTFT_VARIANTS:
        rounds = measured.values[name]
        variants[name] = {"unit": "s", "median": statistics.median(s for r in rounds for s in r), "rounds": rounds}
    ratios = {}
    for name, (num, den, op, target) in RATIO_TARGETS.items():
        value = variants[num]["median"] / variants[den]["median"]
        ok = value >= target if op == ">=" else value <= target
        ratios[name] = {"value": value, "target": f"{op} {target:g}", "pass": ok}
    lengths = [len(p) for p in workload.prompts]
    return {
        "bench": "engine",
        "config": {**asdict(config), "prompt_tokens": [min(lengths), max(lengths)],
                   "ttft": {"busy_requests": BUSY_REQUESTS, "busy_new_tokens": BUSY_NEW_TOKENS,
                            "busy_warm_tokens": BUSY_WARM_TOKENS, "samples_per_round": TTFT_SAMPLES,
                            "short_new_tokens": SHORT_NEW_TOKENS, "short_prompt_tokens": len(workload.short_prompt)}},
        "machine": machine_info(),
        "variants": variants,
        "ratios": ratios,
        "correctness": measured.correctness,
        "notes": measured.notes,
        "elapsed_s": elapsed,
    }


def correctness(workload: Workload, measured: Measurements, peft: PeftBaseline) -> dict:
    """engine_mixed's greedy tokens (every round) against PEFT's one-by-one tokens; PEFT's padded
    mixed batch against the same reference is reported for information."""
    reference = measured.tokens["peft_sequential"][0]
    mismatches = peft.explain_mismatches(workload.prompts, workload.mixed, workload.new_tokens, reference,
                                         measured.tokens["engine_mixed"])
    return {
        "reference": "peft_sequential", "requests": len(reference), "mismatched_requests": len(mismatches),
        "unexplained_mismatches": sum(not m["near_tie"] for m in mismatches), "near_tie_gap": NEAR_TIE_GAP,
        "mismatches": mismatches,
        "peft_sequential_repeatable": all(t == reference for t in measured.tokens["peft_sequential"]),
        "peft_mixed_mismatched_requests": len(first_differences(measured.tokens["peft_mixed"], reference)),
    }


def machine_info() -> dict:
    """Where the numbers came from: enough to tell two machines' results apart."""
    import bitsandbytes
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: platform.processor() is the best we have
        pass
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
    }


def print_report(result: dict) -> None:
    """The human-readable table: variants, ratios with their targets, correctness."""
    c, m = result["config"], result["machine"]
    print(f"\nengine bench: {c['arch']} {c['size']} {c['quantization']}, {c['requests']} requests x "
          f"{c['new_tokens']} new tokens (prompts {c['prompt_tokens'][0]}-{c['prompt_tokens'][1]} tokens), "
          f"{c['adapters']} adapters r={c['rank']}, {c['repeats']} rounds")
    print(f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
          f"torch {m['torch']}, cuda={m['cuda']}" + (f" ({m['gpu']})" if m["gpu"] else ""))
    print(f"\n{'variant':<17} {'median':>14}   rounds")
    for name, v in result["variants"].items():
        if v["unit"] == "s":
            rounds = " | ".join(_ms(r) for r in v["rounds"])
            print(f"{name:<17} {v['median'] * 1000:>11.1f} ms   {rounds}")
        else:
            rounds = ", ".join(f"{x:.1f}" for x in v["rounds"])
            print(f"{name:<17} {v['median']:>8.1f} tok/s   {rounds}")
    print(f"\n{'ratio':<28} {'value':>7}   {'target':<8} result")
    for name, r in result["ratios"].items():
        print(f"{name:<28} {r['value']:>7.2f}   {r['target']:<8} {'PASS' if r['pass'] else 'MISS'}")
    k = result["correctness"]
    print(f"\ncorrectness: engine_mixed greedy tokens differ from peft_sequential on {k['mismatched_requests']} of "
          f"{k['requests']} requests ({k['unexplained_mismatches']} not at a near-tie)")
    for d in k["mismatches"]:
        print(f"  request {d['request']} ({d['adapter']}) from token {d['first_differing_token']}: PEFT's top-2 logit "
              f"gap there {d['peft_top2_logit_gap']:.1e} " + ("(near-tie)" if d["near_tie"] else "(NOT a near-tie)"))
    print(f"  (info: peft_mixed differs from peft_sequential on {k['peft_mixed_mismatched_requests']} of "
          f"{k['requests']}; peft_sequential repeatable across rounds: {k['peft_sequential_repeatable']})")
    print(f"  TTFT medians are over all {c['ttft']['samples_per_round']} samples of every round; busy = "
          f"{c['ttft']['busy_requests']} requests x {c['ttft']['busy_new_tokens']} tokens decoding")
    for note in result["notes"]:
        print(f"note: {note}")
    missed = [name for name, r in result["ratios"].items() if not r["pass"]]
    print(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    print(f"total bench time {result['elapsed_s']:.0f} s")


def _ms(samples: list[float]) -> str:
    return ", ".join(f"{s * 1000:.1f}" for s in samples)
