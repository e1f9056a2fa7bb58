"""Host memory stays flat while hundreds of adapters cycle through the slots and the host cache.

A leak per slot load (a tensor kept by the layers, the host cache, a stream or the scheduler)
would show as resident memory growing with the number of loads; 2,000 loads of tiny adapters
make even a few kilobytes per load visible against a 50 MB bound.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from model_fixtures import collect, greedy_request, running_engine
from safetensors.torch import load_file, save_file

from loraserve.devtools.random_adapters import make_random_adapter

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

ARCH = "deepseek-v3"
NUM_ADAPTERS = 200
TOTAL_LOADS = 2_000
WARMUP_LOADS = 200
GROUP = 16  # requests in flight at once: as many distinct adapters as the host cache holds
MAX_GROWTH_BYTES = 50 * 2**20


def _make_adapters(base_dir: Path, root: Path, count: int) -> list[Path]:
    """`count` rank-8 attention adapters in PEFT layout: one made by PEFT, the others with its
    config and keys and fresh random tensors (far faster than PEFT for each)."""
    template = make_random_adapter(base_dir, root / "a000", r=8, lora_alpha=16, target="attention", seed=0)
    tensors = load_file(template / "adapter_model.safetensors")
    config = json.loads((template / "adapter_config.json").read_text())
    generator = torch.Generator().manual_seed(1)
    paths = [template]
    for i in range(1, count):
        out = root / f"a{i:03d}"
        out.mkdir()
        shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
        fresh = {key: torch.randn(t.shape, generator=generator) * (0.5 if "lora_B" in key else 0.1)
                 for key, t in tensors.items()}
        save_file(fresh, out / "adapter_model.safetensors", metadata={"format": "pt"})
        paths.append(out)
    assert config["r"] == 8 and all(t.shape[0] == 8 or t.shape[1] == 8 for t in tensors.values())
    return paths


def _run_requests(engine, prompt: list[int], names: list[str], first: int, last: int) -> None:
    """Requests first..last-1 (one token each), adapter i % len(names), GROUP at a time."""
    for start in range(first, last, GROUP):
        streams = [engine.submit(greedy_request(prompt, 1, names[i % len(names)]))
                   for i in range(start, min(start + GROUP, last))]
        for stream in streams:
            finish = collect(stream)[1]
            assert finish.finish_reason == "length" and len(finish.token_ids) == 1


def test_rss_flat_over_2000_slot_loads_of_200_adapters(base_dirs, tmp_path: Path) -> None:
    """200 adapters through 4 slots and a 16-adapter host cache, 2,000 slot loads: resident
    memory after the first 200 loads and at the end differ by less than 50 MB."""
    paths = _make_adapters(base_dirs[ARCH], tmp_path, NUM_ADAPTERS)
    names = [f"ad-{i:03d}" for i in range(NUM_ADAPTERS)]
    process = psutil.Process()
    with running_engine(base_dirs[ARCH], "nf4", dict(zip(names, paths)), max_loras=4, max_cpu_loras=16) as engine:
        prompt = engine.encode("The patient")
        _run_requests(engine, prompt, names, 0, WARMUP_LOADS)
        warm = engine.stats()
        assert warm.slot_loads_total >= WARMUP_LOADS
        gc.collect()
        rss_warm = process.memory_info().rss

        _run_requests(engine, prompt, names, WARMUP_LOADS, TOTAL_LOADS)
        gc.collect()
        rss_end = process.memory_info().rss
        stats = engine.stats()

    assert stats.slot_loads_total >= TOTAL_LOADS
    assert stats.slot_evictions_total == stats.slot_loads_total - 4  # all but the first four loads evicted one
    assert stats.disk_loads_total >= TOTAL_LOADS  # 200 adapters never fit the 16-adapter host cache
    assert len(stats.host_cached) <= 16 and len(stats.slots_resident) <= 4
    assert stats.running == stats.waiting == 0 and stats.slots_in_use == []
    growth = rss_end - rss_warm
    assert growth < MAX_GROWTH_BYTES, (
        f"resident memory grew {growth / 2**20:.1f} MB over {stats.slot_loads_total - warm.slot_loads_total} slot loads")
