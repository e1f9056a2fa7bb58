"""`loraserve demo`: the engine end to end on a machine with no hub access.

Builds a tiny DeepSeek-architecture base and a few random adapters locally, loads the base
quantized (NF4 by default) exactly as a real checkpoint would be, then serves one batch that
mixes the base and every adapter, streaming one request to the terminal, and prints each
request's output and the throughput.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from server.base.synthetic import init_model
from server.config import BaseModelConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams, TokenEvent
from server.lora.synthetic import make_random_adapter

PROMPTS = [
    "The patient presents with",
    "窦性心律不齐是指",
    "def parse_config(path):",
    "Summarise the contract clause:",
]
TARGETS = ("attention", "mlp", "all-linear")


def run_demo(workdir: str | None, arch: str = "deepseek-v3", quantization: str = "nf4", num_adapters: int = 4) -> int:
    """Run the demo; returns a process exit code."""
    with tempfile.TemporaryDirectory(prefix="loraserve-demo-") as tmp:
        root = Path(workdir or tmp)
        base_dir = root / "base"
        if not (base_dir / "config.json").exists():
            init_model(base_dir, arch, "tiny", seed=0)
        print(f"base: tiny {arch} at {base_dir}")
        fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        adapters = {}
        for i in range(num_adapters):
            name = f"task-{i}"
            path = root / "adapters" / name
            if not (path / "adapter_config.json").exists():
                make_random_adapter(base_dir, path, r=(4, 8, 16)[i % 3], lora_alpha=16,
                                    target=TARGETS[i % len(TARGETS)], seed=i, model=fp32)
            adapters[name] = path
        del fp32

        config = EngineConfig(base=BaseModelConfig(str(base_dir), quantization=quantization),
                              max_loras=max(2, num_adapters // 2), max_cpu_loras=max(4, num_adapters))
        started = time.monotonic()
        engine = Engine.load(config)
        engine.start()
        print(f"loaded in {time.monotonic() - started:.1f}s: quantization={quantization}, "
              f"fingerprint={engine.base.fingerprint[:19]}..., max_loras={config.max_loras}")
        for name, path in adapters.items():
            entry = engine.add_adapter(name, path)
            print(f"registered {name}: r={entry.rank}, {entry.modules} modules")
        try:
            return _serve_mixed_batch(engine, list(adapters))
        finally:
            engine.stop()


def _serve_mixed_batch(engine: Engine, adapter_names: list[str]) -> int:
    jobs = [(None, PROMPTS[0])] + [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(adapter_names)]
    jobs += [(None, PROMPTS[1]), (adapter_names[0], PROMPTS[1])]
    sampling = SamplingParams(max_new_tokens=24, ignore_eos=True)
    started = time.monotonic()
    streams = [engine.submit(GenerationRequest(engine.encode(prompt), sampling, adapter))
               for adapter, prompt in jobs]
    print(f"\nstreaming request 1 ({jobs[0][0] or 'base'}): ", end="", flush=True)
    for event in streams[0]:
        if isinstance(event, TokenEvent):
            print(event.text, end="", flush=True)
    print()
    results = [s.result() for s in streams[1:]]
    elapsed = time.monotonic() - started
    print(f"\n{'adapter':<10} {'tokens':>6} {'ttft ms':>8}  output")
    total = 0
    for (adapter, prompt), result in zip(jobs[1:], results):
        total += result.completion_tokens
        print(f"{adapter or 'base':<10} {result.completion_tokens:>6} {1000 * result.timings.first_token_s:>8.1f}  "
              f"{prompt!r} -> {result.text[:48]!r}")
    total += sampling.max_new_tokens  # the streamed request (ignore_eos: always the full count)
    stats = engine.stats()
    print(f"\n{len(jobs)} requests, {total} tokens in {elapsed:.2f}s = {total / elapsed:.1f} tokens/s "
          f"(random weights: the text is noise, the batching is real)")
    print(f"slots: {stats.slot_loads_total} loads, {stats.slot_evictions_total} evictions; "
          f"host cache: {len(stats.host_cached)} adapters")
    return 0
