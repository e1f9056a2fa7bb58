"""One tenant's adapter can never change another's output: a slot's values reach only the rows
that use that slot, a freed slot holds nothing, and a row whose numbers go bad ends alone.

Validation refuses NaN and overflowing weights (test_adapter_validation.py), so these tests
write such weights past it (`loraserve.devtools.bench.poison`). Every other request is compared token
for token with a clean run of the same batch, while the bad adapters sit in slots and after
they are unregistered.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import PROMPTS, collect, greedy_request, running_engine

from loraserve.devtools.bench.poison import poison
from loraserve.engine.native import NativeEngine
from loraserve.errors import AdapterIncompatible
from loraserve.lora.expert_layers import ExpertLoraSlots

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

HEALTHY = ("att-r4", "mlp-r8", "all-r16")
# Each bad adapter is registered with a healthy adapter's files, then its decoded weights are
# replaced: NaN in one A, +inf in one B.
BAD = {"bad-nan": ("all-r8-a32", "A", float("nan")), "bad-inf": ("att-r16", "B", float("inf"))}
STAND_INS = {"bad-nan": "all-r8-a32", "bad-inf": "att-r16"}  # the clean run uses these instead
N = 12


def _batch(engine: NativeEngine, adapters: list[str | None]) -> list:
    """Submit one request per adapter (prompts cycle), all at once; the streams, in order."""
    ids = [engine.encode(p) for p in PROMPTS]
    return [engine.submit(greedy_request(ids[i % len(ids)], N, a)) for i, a in enumerate(adapters)]


def _layout(bad: tuple[str, str]) -> list[str | None]:
    """Healthy adapters and base rows around the two bad ones, so every step mixes them."""
    return [HEALTHY[0], None, bad[0], HEALTHY[1], HEALTHY[2], bad[1], HEALTHY[0], None, HEALTHY[1]]


@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("arch", ["deepseek-v3", "deepseek-llm"])
def test_poisoned_slots_change_no_other_request(base_dirs, adapter_dirs, arch: str, quantization: str) -> None:
    adapters = adapter_dirs(arch)
    clean_layout = _layout((STAND_INS["bad-nan"], STAND_INS["bad-inf"]))
    registered = {name: adapters[name] for name in (*HEALTHY, *STAND_INS.values())}
    with running_engine(base_dirs[arch], quantization, registered, max_loras=5, max_cpu_loras=16) as engine:
        clean = [collect(s)[1].token_ids for s in _batch(engine, clean_layout)]

    others = [i for i, a in enumerate(clean_layout) if a not in STAND_INS.values()]
    registered = {name: adapters[name] for name in HEALTHY}
    with running_engine(base_dirs[arch], quantization, registered, max_loras=5, max_cpu_loras=16) as engine:
        for bad, (files, which, value) in BAD.items():
            engine.add_adapter(bad, adapters[files])
            poison(engine, bad, which, value)
        streams = _batch(engine, _layout(("bad-nan", "bad-inf")))
        for i, stream in enumerate(streams):
            if i in others:
                assert collect(stream)[1].token_ids == clean[i], f"request {i} ({clean_layout[i]}) changed"
            else:  # the bad adapter's own request ends with its own error, nobody else's
                with pytest.raises(AdapterIncompatible, match="non-finite logits"):
                    collect(stream)
        assert {"bad-nan", "bad-inf"} <= {k.rsplit("#", 1)[0] for k in engine.stats().slots_resident}

        # The bad adapters stay resident in their slots while healthy batches mix around them.
        again = [collect(s)[1].token_ids for s in
                 _batch(engine, [a if a not in STAND_INS.values() else HEALTHY[2] for a in clean_layout])]
        for i in others:
            assert again[i] == clean[i], f"request {i} ({clean_layout[i]}) changed beside resident bad slots"

        # Unregistered: their slots are freed and zeroed; the stand-ins load into those slots.
        for bad in BAD:
            engine.remove_adapter(bad)
        for name, stand_in in STAND_INS.items():
            engine.add_adapter(stand_in, adapters[stand_in])
        slots = engine._scheduler.slots
        for layer in slots._layers.values():
            free = set(range(1, slots.max_loras + 1)) - set(slots._slot_of.values())
            for slot in free:
                assert not layer.holds(slot)
        after = [collect(s)[1].token_ids for s in _batch(engine, clean_layout)]
    assert after == clean, "every request, the stand-ins' included, equals the clean run after unregistering"


def test_freed_slot_is_zeroed_in_every_layer(base_dirs, adapter_dirs) -> None:
    adapters = adapter_dirs("deepseek-v3")
    with running_engine(base_dirs["deepseek-v3"], "none", {"all-r16": adapters["all-r16"]}, max_loras=2) as engine:
        collect(_batch(engine, ["all-r16"])[0])
        slots = engine._scheduler.slots
        key = next(e.version for e in engine.adapters())
        slot = slots.slot_of(key)
        layers = list(slots._layers.values())
        assert any(layer.holds(slot) for layer in layers)
        assert any(isinstance(layer, ExpertLoraSlots) for layer in layers), "the V3 base has routed-expert slots too"
        engine.remove_adapter("all-r16")
        engine.stats()  # a round trip through the engine thread: the removal has run
        assert slots.slot_of(key) is None
        assert not any(layer.holds(slot) for layer in layers)


def test_grouped_and_per_slot_paths_agree(base_dirs, adapter_dirs) -> None:
    """The fallback for devices without grouped_mm gives the same numbers as grouped_mm."""
    from loraserve.lora import layers as lora_layers

    adapters = adapter_dirs("deepseek-llm")
    names = ["att-r4", "mlp-r8", "all-r16"]
    outputs = []
    for grouped in (True, False):
        with running_engine(base_dirs["deepseek-llm"], "none", {n: adapters[n] for n in names}, max_loras=4) as engine:
            for layer in engine._scheduler.slots._layers.values():
                layer._grouped = grouped and lora_layers.grouped_mm_works(layer.lora_a.device, layer.lora_a.dtype)
            outputs.append([collect(s)[1].token_ids for s in _batch(engine, [names[0], None, names[1], names[2],
                                                                              names[0]])])
    assert outputs[0] == outputs[1]


def _layer_cases():
    cases = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        cases += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return [pytest.param(d, t, marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{d}-{t}".replace("torch.", ""))
            for d, t in cases]


PATHS = ("row kernel", "per-sequence", "per-row", "grouped", "per-slot")


def _force(layer, context, path: str, monkeypatch) -> None:
    """Send the layer's several-adapter batches down `path` (as far as the device allows)."""
    from loraserve.lora import batch_context, layers

    monkeypatch.setattr(batch_context, "KERNEL_ROWS_PER_SLOT", 10**6 if path == "row kernel" else 0)
    monkeypatch.setattr(batch_context, "BAG_ROWS_PER_SLOT", 10**6 if path == "per-row" else 0)
    layer._per_sequence_ok = path == "per-sequence"
    layer._grouped = path != "per-slot" and layers.grouped_mm_works(layer.lora_a.device, layer.lora_a.dtype)


def _available(layer, path: str, tokens: int) -> bool:
    if path == "row kernel":
        return layer._row_kernel and tokens == 1
    if path == "per-sequence":
        return layer.lora_a.device.type == "cpu" and tokens > 1
    return True


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device, dtype", _layer_cases())
@torch.inference_mode()  # as the engine runs
def test_a_nan_slot_reaches_no_other_row_in_the_layer(device: str, dtype: torch.dtype, path: str, monkeypatch) -> None:
    """The layer alone, on each device and dtype it runs in, down each path it takes there: rows
    of healthy slots and of slot 0 are the same whether another slot holds NaN and inf or zeros,
    in a decode-shaped and a prefill-shaped batch."""
    from torch import nn

    from loraserve.lora.batch_context import LoraBatchContext
    from loraserve.lora.layers import MultiLoraLinear

    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(device=device, dtype=dtype)
    context = LoraBatchContext()
    context.num_slots = 5
    layer = MultiLoraLinear(base, 5, 16, context, dtype)
    _force(layer, context, path, monkeypatch)
    for slot in (1, 2, 3):
        layer.load_slot(slot, torch.randn(8, 64, device=device), torch.randn(48, 8, device=device), 0.5)
    slots = [1, 0, 4, 2, 3, 4, 1, 0]  # slot 4: the bad one
    tested = 0
    for tokens in (1, 5):
        if not _available(layer, path, tokens):
            continue
        x = torch.randn(len(slots), tokens, 64, device=device, dtype=dtype)
        context.set(slots)
        layer.clear_slot(4)
        clean = layer(x)
        bad = torch.full((8, 64), float("nan"), device=device)
        layer.load_slot(4, bad, torch.full((48, 8), float("inf"), device=device), 1.0)
        context.set(slots)
        poisoned = layer(x)
        others = [i for i, s in enumerate(slots) if s != 4]
        assert torch.equal(poisoned[others], clean[others]), f"{device}/{dtype}, {tokens} tokens per row"
        assert torch.isnan(poisoned[[i for i, s in enumerate(slots) if s == 4]]).all()
        tested += 1
    if not tested:
        pytest.skip(f"the {path} path does not run on {device}/{dtype}")


@pytest.mark.parametrize("max_rank, ranks, untargeted", [(16, (4, 16, 8), True), (64, (4, 40, 64), True),
                                                         (16, (16, 16, 16), False)])  # the last: all at full rank
@pytest.mark.parametrize("device, dtype", _layer_cases())
@torch.inference_mode()  # as the engine runs
def test_every_path_computes_each_rows_own_adapter(device: str, dtype: torch.dtype, max_rank: int,
                                                   ranks: tuple[int, int, int], untargeted: bool,
                                                   monkeypatch) -> None:
    """Each path (the row kernel on CPU in float32 at decode, per-sequence batched matmuls on CPU
    with several tokens per sequence, per-row embedding_bag, grouped GEMMs, per-slot matmuls)
    gives every row x @ A[s] @ B[s] of its own slot at its own rank (slot 0, and a slot whose
    adapter does not target this module: nothing), for slots spread over the table (empty slots
    between); and each batch shape takes the path meant for it by default."""
    from torch import nn

    from loraserve.lora.batch_context import LoraBatchContext
    from loraserve.lora.layers import MultiLoraLinear

    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(device=device, dtype=dtype)
    context = LoraBatchContext(9)
    layer = MultiLoraLinear(base, 9, max_rank, context, dtype)
    weights = {}
    for slot, r in zip((2, 5, 8), ranks):
        a, b = torch.randn(r, 64, device=device), torch.randn(48, r, device=device)
        layer.load_slot(slot, a, b, 0.5)
        weights[slot] = (a.to(dtype), (b * 0.5).to(dtype))
    layer.load_slot(7, None, None, 0.0)  # an adapter that does not target this module
    slots = [5, 0, 2, 8, 5, 7, 2, 0, 8] if untargeted else [5, 0, 2, 8, 5, 2, 0, 8]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    cpu_fp32 = device == "cpu" and dtype == torch.float32
    assert layer._row_kernel == cpu_fp32 and layer._per_sequence_ok == (device == "cpu")
    context.set(slots)
    assert context.kernel_rows(1) and not context.kernel_rows(6)  # decode: the kernel where it runs
    assert context.per_row(1) and not context.per_row(6)  # elsewhere decode per row, prefill grouped
    for tokens in (1, 6):
        x = torch.randn(len(slots), tokens, 64, device=device, dtype=dtype)
        expected = base(x).float()
        for i, s in enumerate(slots):
            if s in weights:
                a, b = weights[s]
                expected[i] += ((x[i].float() @ a.float().t()) @ b.float().t())
        for path in PATHS:
            if not _available(layer, path, tokens):
                continue
            with monkeypatch.context() as patch:
                _force(layer, context, path, patch)
                context.set(slots)
                out = layer(x).float()
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            assert error < tolerance, f"{path} path, {tokens} tokens per row: relative error {error:.2e}"
