"""Adapters with NaN or infinite weights in the engine's slots beside healthy ones, for the
isolation test and `bench abuse`.

Validation refuses such weights, so these helpers write them past it, into the engine's host
tier, as a bug, a bit flip or an adapter that overflows only on some inputs would put them there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from loraserve.engine.native import NativeEngine
from loraserve.lora.adapter import LoraWeights, ModuleLora

BAD = {"bad-nan": ("A", float("nan")), "bad-inf": ("B", float("inf"))}
"""Which tensor of a bad adapter's first module is spoiled, and with what."""


def poisoned(weights: LoraWeights, which: str, value: float) -> LoraWeights:
    """A copy of `weights` with `value` at [0, 0] of the first module's A or B."""
    modules = dict(weights.modules)
    name = sorted(modules)[0]
    m = modules[name]
    a, b = m.a.clone(), m.b.clone()
    (a if which == "A" else b)[0, 0] = value
    modules[name] = ModuleLora(a, b, m.scaling)
    return LoraWeights(weights.name, modules, weights.rank)


def poison(engine: NativeEngine, name: str, which: str, value: float) -> None:
    """Spoil the decoded weights of registered adapter `name` in the host tier (on the engine
    thread, between two steps, as every change of its state)."""
    entry = next(e for e in engine.adapters() if e.adapter_id == name)
    scheduler = engine._scheduler

    def swap() -> None:
        weights = scheduler.host.get(entry.version)
        if weights is None:
            raise RuntimeError(f"adapter {name} is not in host memory")
        scheduler.host.put(entry.version, poisoned(weights, which, value), keep=set())
    engine._on_engine(swap)


def changed_tokens(base_dir: Path, quantization: str, new_tokens: int = 16) -> dict:
    """Greedy tokens changed for the healthy and base requests of one batch when two of its
    requests use a NaN and an inf adapter, against the same batch with healthy stand-ins, and
    again after the bad adapters are unregistered and the stand-ins load into their slots."""
    from loraserve.config import BaseModelConfig, EngineConfig
    from loraserve.devtools.random_adapters import make_random_adapter
    from loraserve.engine.request import GenerationRequest, SamplingParams

    with tempfile.TemporaryDirectory(prefix="loraserve-poison-") as tmp:
        names = ["h0", "h1", "h2", "s-nan", "s-inf"]
        dirs = {n: make_random_adapter(base_dir, Path(tmp) / n, r=8, target="all-linear", seed=i)
                for i, n in enumerate(names)}
        layout = ["h0", None, "BAD-nan", "h1", "h2", "BAD-inf", "h0", None, "h1"]
        prompts = ["The patient reports", "患者主诉胸闷", "def f(x):", '{"r": 8,', "Dear customer", "The contract",
                   "Question: why?", "今天天气很好", "Summarise:"]

        def run(engine: NativeEngine, adapters: list[str | None]) -> list[list[int] | None]:
            streams = [engine.submit(GenerationRequest(engine.encode(p), SamplingParams(
                max_new_tokens=new_tokens, ignore_eos=True), a)) for p, a in zip(prompts, adapters)]
            out = []
            for s in streams:
                try:
                    out.append(s.result().token_ids)
                except Exception:  # noqa: BLE001 - the bad adapters' own requests end with their error
                    out.append(None)
            return out

        def load() -> NativeEngine:
            config = EngineConfig(base=BaseModelConfig(str(base_dir), quantization=quantization), max_loras=5)
            engine = NativeEngine.load(config)
            engine.start()
            return engine
        stand_in = {"BAD-nan": "s-nan", "BAD-inf": "s-inf"}
        others = [i for i, a in enumerate(layout) if a not in stand_in]
        engine = load()
        try:
            for n in names:
                engine.add_adapter(n, dirs[n])
            clean = run(engine, [stand_in.get(a, a) for a in layout])
        finally:
            engine.stop()
        engine = load()
        try:
            for n in names[:3]:
                engine.add_adapter(n, dirs[n])
            for bad, (which, value) in BAD.items():
                engine.add_adapter(bad, dirs[stand_in["BAD-" + bad.split("-")[1]]])
                poison(engine, bad, which, value)
            mixed = run(engine, [a.replace("BAD-", "bad-") if a and a.startswith("BAD-") else a for a in layout])
            for bad in BAD:
                engine.remove_adapter(bad)
            for n in stand_in.values():
                engine.add_adapter(n, dirs[n])
            after = run(engine, [stand_in.get(a, a) for a in layout])
        finally:
            engine.stop()

    def changed(run_tokens: list) -> int:
        return sum(sum(x != y for x, y in zip(run_tokens[i] or [], clean[i])) + abs(len(run_tokens[i] or []) - len(clean[i]))
                   for i in others)
    return {"other_requests": len(others), "tokens_each": new_tokens,
            "changed_tokens_beside_bad_slots": changed(mixed), "changed_tokens_after_unregister": changed(after),
            "bad_requests_failed_alone": sum(mixed[i] is None for i in range(len(layout)) if i not in others)}
