"""The training half of `loraserve demo`: a tiny base built locally, and one adapter trained on
each example dataset shipped in `trainer/examples/` — the loop a platform team runs, from data
to an adapter directory ready to register."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import loraserve.trainer as trainer_package

EXAMPLES_DIR = Path(trainer_package.__file__).resolve().parent / "examples"
# adapter name -> dataset; each teaches the base something it cannot do on its own.
TASKS = {
    "medical-terms": "medical_terms_zh.jsonl",
    "format-conversion": "format_conversion.jsonl",
    "style-formal": "style_formal.jsonl",
}
# Enough for the tiny base to learn these 36-40 examples by heart on 2 CPU cores in about a
# minute per adapter: the demo shows the adapters working, not a recipe for a real model.
# (With 3% warmup, lr 1e-2 sometimes collapsed a run to a constant output; 10% did not.)
DEMO_TRAINING = dict(r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-2, epochs=100, batch_size=8,
                     warmup_ratio=0.1, eval_fraction=0.0, gradient_checkpointing=False, logging_steps=100, seed=0)


@dataclass(frozen=True)
class TrainedTask:
    name: str
    dataset: Path
    adapter_dir: Path


def build_base(root: Path, arch: str) -> Path:
    """A tiny DeepSeek-architecture base under root/base (reused when already there)."""
    from loraserve.devtools.synthetic_base import init_model

    base_dir = root / "base"
    if not (base_dir / "config.json").exists():
        init_model(base_dir, arch, "tiny", seed=0)
    print(f"base: tiny {arch} at {base_dir}")
    return base_dir


def train_tasks(base_dir: Path, out_dir: Path, quantization: str) -> list[TrainedTask]:
    """Train one adapter per example dataset into out_dir/<name>/ (kept when already trained
    on this base)."""
    from transformers.utils import logging as hf_logging

    from loraserve.base.fingerprint import base_fingerprint
    from loraserve.trainer.config import TrainConfig
    from loraserve.trainer.train import train

    hf_logging.disable_progress_bar()
    fingerprint = base_fingerprint(base_dir)
    tasks = []
    print(f"{'adapter':<18} {'examples':>8} {'steps':>6} {'loss step 1':>11} {'final loss':>10} {'seconds':>8}")
    for name, file in TASKS.items():
        dataset = EXAMPLES_DIR / file
        manifest_path = out_dir / name / "manifest.json"
        if _trained_alike(manifest_path, fingerprint, quantization):
            print(f"{name:<18} already trained on this base: {out_dir / name}")
        else:
            started = time.monotonic()
            result = train(TrainConfig(model=str(base_dir), quantization=quantization, train_file=str(dataset),
                                       adapter_name=name, output_dir=str(out_dir), **DEMO_TRAINING))
            m = result.manifest
            losses = [m["metrics"].get("first_train_loss"), m["metrics"].get("final_train_loss")]
            print(f"{name:<18} {m['dataset']['train']['examples']:>8} {m['metrics']['steps']:>6} "
                  f"{_num(losses[0]):>11} {_num(losses[1]):>10} {time.monotonic() - started:>8.1f}", flush=True)
        tasks.append(TrainedTask(name, dataset, out_dir / name))
    return tasks


def _trained_alike(manifest_path: Path, fingerprint: str, quantization: str) -> bool:
    """An adapter from an earlier run with the same base and settings is reused."""
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text())
    settings = manifest.get("hyperparameters", {})
    return (manifest.get("base_fingerprint") == fingerprint and manifest.get("quantization") == quantization
            and all(settings.get(k) == v for k, v in DEMO_TRAINING.items()))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
