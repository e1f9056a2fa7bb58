"""`python -m loraserve.devtools.bench.mla_bench`: one decode step of the native engine's runner
with absorbed MLA (engine/mla_absorbed.py) against transformers' unabsorbed attention, at a few
context lengths, on a synthetic DeepSeek base loaded as the engine loads it (NF4 by default).

Both variants decode the same prefilled batch on the same model: each round runs them in an
order rotated from round to round, and the report gives medians and their ratio, all taken in
this one run (the machine is noisy; alternating spreads a slow spell over both).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.synthetic_base import init_model
from loraserve.engine.mla_absorbed import install_absorbed_mla, remove_absorbed_mla
from loraserve.engine.native import NativeEngine
from loraserve.engine.runner import ModelRunner


def _rewind(runner: ModelRunner, steps: int) -> None:
    """Drop the last `steps` decoded tokens of every row, so every measurement sees the same
    context (the bench reaches into the cache; the engine never shrinks a row's tokens)."""
    for region in runner.cache.rows:
        region.length -= steps


def _absorb(model: torch.nn.Module, on: bool) -> None:
    if on:
        install_absorbed_mla(model, quantized=True)
    else:
        remove_absorbed_mla(model)


def time_steps(runner: ModelRunner, slots: list[int], steps: int) -> float:
    """Seconds per decode step of the prefilled rows with adapter `slots` (one per row),
    averaged over `steps` steps, context rewound afterwards."""
    tokens = [1] * len(slots)
    start = time.perf_counter()
    for _ in range(steps):
        runner.decode(tokens, slots)
    elapsed = (time.perf_counter() - start) / steps
    _rewind(runner, steps)
    return elapsed


def run_mla_bench(arch: str, size: str, quantization: str, contexts: list[int], batch: int,
                  rounds: int, steps: int, threads: int) -> dict[int, tuple[float, float]]:
    """context -> (unabsorbed, absorbed) median ms per decode step; printed as it goes."""
    if threads:
        torch.set_num_threads(threads)
    results: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = init_model(Path(tmp) / arch, arch, size, seed=0)
        engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization=quantization)))
        model = engine.loaded_base.model
        context = engine._scheduler.runner.context
        vocab = model.config.vocab_size
        print(f"{arch} {size} {quantization}, batch {batch}, {steps} steps x {rounds} rounds, "
              f"{torch.get_num_threads()} threads")
        for length in contexts:
            runner = ModelRunner(model, context, mla_absorb=False)
            gen = torch.Generator().manual_seed(length)
            prompts = [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(batch)]
            runner.prefill(prompts, [0] * batch, [runner.reserve(length + 2 * steps) for _ in range(batch)])
            times: dict[str, list[float]] = {"unabsorbed": [], "absorbed": []}
            variants = list(times)
            for variant in variants:  # warm-up, weights dequantized once
                _absorb(model, variant == "absorbed")
                time_steps(runner, [0] * batch, 1)
            for r in range(rounds):
                for variant in variants[r % 2:] + variants[:r % 2]:
                    _absorb(model, variant == "absorbed")
                    times[variant].append(time_steps(runner, [0] * batch, steps))
            plain = statistics.median(times["unabsorbed"]) * 1e3
            absorbed = statistics.median(times["absorbed"]) * 1e3
            results[length] = (plain, absorbed)
            print(f"context {length:5d}: unabsorbed {plain:8.2f} ms/step  absorbed {absorbed:8.2f} ms/step  "
                  f"ratio (unabsorbed/absorbed) {plain / absorbed:5.2f}x", flush=True)
            runner.remove_rows(set(range(batch)))
        remove_absorbed_mla(model)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="deepseek-v3", choices=("deepseek-v3", "deepseek-v2"))
    p.add_argument("--size", default="small", choices=("tiny", "small"))
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--contexts", default="64,1024", help="comma-separated context lengths")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="decode steps per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    with torch.inference_mode():
        run_mla_bench(a.arch, a.size, a.quantization, [int(c) for c in a.contexts.split(",")], a.batch,
                      a.rounds, a.steps, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
