"""`python -m loraserve.devtools.bench.expert_bench`: what LoRA on the routed MoE experts costs a
decode step of the native engine, against base-only and attention-only adapters, on a synthetic
DeepSeek base loaded as the engine loads it (NF4 experts by default).

One prefilled batch is decoded with each slot layout in turn on the same model and cache; each
round rotates the order, and the report gives medians and ratios to base-only, all taken in this
one run (the machine is noisy; alternating spreads a slow spell over every layout).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.bench.mla_bench import time_steps
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.synthetic_base import init_model
from loraserve.engine.native import NativeEngine
from loraserve.engine.runner import ModelRunner
from loraserve.lora import expert_layers

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _layouts(batch: int, distinct: int, attention: list[int], experts: list[int]) -> dict[str, tuple[list[int], int]]:
    """Slot of each row, and the experts' per-pair threshold, for every measured layout (the last
    forces one matmul pair per (slot, expert) group, the path prefill takes, for comparison)."""
    mixed = [experts[i % distinct] for i in range(batch)]
    default = expert_layers.BAG_ROWS_PER_EXPERT
    return {
        "base only": ([0] * batch, default),
        f"{distinct} attention adapters": ([attention[i % distinct] for i in range(batch)], default),
        "1 attention+experts adapter": ([experts[0]] * batch, default),
        f"{distinct} attention+experts adapters": (mixed, default),
        f"{distinct} att+experts, matmul/expert": (mixed, 0),
    }


def run_expert_bench(arch: str, size: str, quantization: str, batch: int, distinct: int, rank: int,
                     context: int, rounds: int, steps: int, threads: int) -> dict[str, float]:
    """layout -> median ms per decode step; printed as it goes."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = init_model(Path(tmp) / arch, arch, size, seed=0)
        fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        made = {}
        for i in range(distinct):
            made[f"att{i}"] = make_random_adapter(base_dir, Path(tmp) / f"att{i}", r=rank, target="attention",
                                                  seed=i, model=fp32)
            made[f"exp{i}"] = make_random_adapter(base_dir, Path(tmp) / f"exp{i}", r=rank, target="attention",
                                                  seed=100 + i, model=fp32, target_parameters=EXPERTS)
        del fp32
        engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization=quantization),
                                                max_loras=2 * distinct, max_lora_rank=rank))
        scheduler = engine._scheduler
        model, lora_context = scheduler.runner.model, scheduler.runner.context
        slots = {name: scheduler.slots.acquire(name, engine.read_adapter(name, path)[0]) for name, path in made.items()}
        layouts = _layouts(batch, distinct, [slots[f"att{i}"] for i in range(distinct)],
                           [slots[f"exp{i}"] for i in range(distinct)])
        runner = ModelRunner(model, lora_context)
        gen = torch.Generator().manual_seed(0)
        runner.prefill([torch.randint(3, model.config.vocab_size, (context,), generator=gen).tolist()
                        for _ in range(batch)], [0] * batch, [runner.reserve(context + 2 * steps) for _ in range(batch)])
        print(f"{arch} {size} {quantization}, batch {batch}, context {context}, rank {rank}, "
              f"{steps} steps x {rounds} rounds, {torch.get_num_threads()} threads")

        def step_ms(layout: tuple[list[int], int]) -> float:
            slots, expert_layers.BAG_ROWS_PER_EXPERT = layout
            return time_steps(runner, slots, steps) * 1e3

        names = list(layouts)
        for name in names:  # warm-up
            step_ms(layouts[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(step_ms(layouts[name]))
        expert_layers.BAG_ROWS_PER_EXPERT = layouts["base only"][1]
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, ms in medians.items():
            print(f"{name:36s} {ms:8.2f} ms/step  base-only / this {medians['base only'] / ms:5.2f}x", flush=True)
    return medians


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="deepseek-v3", choices=("deepseek-v3", "deepseek-v2"))
    p.add_argument("--size", default="small", choices=("tiny", "small"))
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--distinct", type=int, default=8, help="distinct adapters in the mixed layouts")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="decode steps per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    with torch.inference_mode():
        run_expert_bench(a.arch, a.size, a.quantization, a.batch, a.distinct, a.rank, a.context, a.rounds,
                         a.steps, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
