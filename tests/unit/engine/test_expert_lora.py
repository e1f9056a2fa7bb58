"""LoRA on the routed MoE experts (loraserve.lora.expert_layers): adapters made by plain PEFT on
DeepSeek-V2/V3 (MLP targets become `target_parameters` on the fused experts) are served mixed in
one batch with attention-only adapters and base rows, equal to PEFT on each request alone, on
the unquantized base and on NF4 experts; their factors match PEFT's own delta weights; and the
adapters the engine cannot serve that way are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_fixtures import (
    PROMPTS,
    DequantizedExpertsReference,
    PeftReference,
    collect,
    greedy_request,
    running_engine,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraserve.base.moe_experts import EXPERT_WEIGHTS
from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.engine.native import NativeEngine
from loraserve.errors import AdapterIncompatible, ResourceExhausted
from loraserve.lora import expert_layers
from loraserve.lora.expert_layers import IMPLEMENTATION, ExpertLoraSlots, SlotRows

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

MOE_ARCHS = ("deepseek-v2", "deepseek-v3")
ATTENTION = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def _peft_adapter(base_dir: Path, out: Path, seed: int, **fields) -> Path:
    """An adapter made the way a user makes one: plain PEFT (its transformers-5 rewrite on), random
    A and B large enough that a missing or misplaced term changes greedy tokens."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **fields))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def expert_adapters(tmp_path_factory, base_dirs) -> dict[str, dict[str, Path]]:
    """Per arch: mlp (both expert parameters, PEFT's doubled gate_up rank), att+mlp, down-only at
    its own rank, and an attention-only adapter."""
    root = tmp_path_factory.mktemp("expert-adapters")
    made = {}
    for arch in MOE_ARCHS:
        base = base_dirs[arch]
        made[arch] = {
            "mlp": _peft_adapter(base, root / arch / "mlp", 1, r=4, lora_alpha=8,
                                 target_modules=["gate_proj", "up_proj", "down_proj"]),
            "att-mlp": _peft_adapter(base, root / arch / "att-mlp", 2, r=8, lora_alpha=8,
                                     target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"]),
            "down": _peft_adapter(base, root / arch / "down", 3, r=4, lora_alpha=16, target_modules=["o_proj"],
                                  target_parameters=["mlp.experts.down_proj"], rank_pattern={"down_proj": 2}),
            "att": _peft_adapter(base, root / arch / "att", 4, r=4, lora_alpha=8, target_modules=ATTENTION),
        }
    return made


def _waves(engine: NativeEngine) -> list[tuple[str | None, list[int], int]]:
    ids = [engine.encode(p) for p in PROMPTS]
    return [("mlp", ids[0], 12), (None, ids[1], 10), ("att-mlp", ids[2], 12), ("down", ids[3], 8),
            ("att", ids[4], 10), ("mlp", ids[5], 8), ("down", ids[6], 12), (None, ids[7], 8), ("att-mlp", ids[1], 10)]


def _serve(base: Path, quantization: str, adapters: dict[str, Path],
           **limits: int) -> list[tuple[str | None, list[int], int, list[int]]]:
    """Every request of `_waves` submitted at once (four adapters through two slots, base rows
    among them); (adapter, prompt, n, tokens) of each."""
    with running_engine(base, quantization, adapters, max_loras=2, **limits) as engine:
        waves = _waves(engine)
        streams = [engine.submit(greedy_request(p, n, a)) for a, p, n in waves]
        tokens = [collect(s)[1].token_ids for s in streams]
        stats = engine.stats()
    assert stats.slot_evictions_total > 0, "four adapters through two slots must evict"
    return [(a, p, n, t) for (a, p, n), t in zip(waves, tokens)]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_adapters_mixed_in_a_batch_match_peft(base_dirs, expert_adapters, arch):
    adapters = expert_adapters[arch]
    served = _serve(base_dirs[arch], "none", adapters)
    reference = PeftReference(base_dirs[arch], "none")
    for adapter, prompt, n, tokens in served:
        expected = reference.greedy(adapters[adapter] if adapter else None, prompt, n)
        assert tokens == expected, f"{arch} adapter={adapter} prompt={prompt[:6]}..."
    # the expert LoRA terms matter: without them the tokens differ
    prompt = served[0][1]
    assert reference.greedy(adapters["mlp"], prompt, 12) != reference.greedy(None, prompt, 12)


def test_expert_adapters_through_chunked_prefill_match_peft(base_dirs, expert_adapters):
    """Prompts prefilled 3 tokens a step, between decode steps of the others."""
    adapters = expert_adapters["deepseek-v3"]
    served = _serve(base_dirs["deepseek-v3"], "none", adapters, max_prefill_tokens=3)
    reference = PeftReference(base_dirs["deepseek-v3"], "none")
    for adapter, prompt, n, tokens in served:
        assert len(prompt) > 3
        assert tokens == reference.greedy(adapters[adapter] if adapter else None, prompt, n), adapter


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_adapters_on_nf4_experts_match_peft_on_their_values(base_dirs, expert_adapters, arch):
    adapters = expert_adapters[arch]
    served = _serve(base_dirs[arch], "nf4", adapters)
    reference = DequantizedExpertsReference(base_dirs[arch])
    for adapter, prompt, n, tokens in served:
        expected = reference.greedy(adapters[adapter] if adapter else None, prompt, n)
        assert tokens == expected, f"{arch}/nf4 adapter={adapter} prompt={prompt[:6]}..."


@pytest.mark.parametrize("bag_rows", [0, 10**6], ids=["matmul-per-expert", "per-pair-bags"])
def test_slot_factors_are_pefts_delta_weights(base_dirs, expert_adapters, monkeypatch, bag_rows):
    """Expert e of a slot computes x @ delta_W[e].T, delta_W being PEFT's own get_delta_weight,
    on both paths."""
    monkeypatch.setattr(expert_layers, "BAG_ROWS_PER_EXPERT", bag_rows)
    base = AutoModelForCausalLM.from_pretrained(base_dirs["deepseek-v3"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(expert_adapters["deepseek-v3"]["att-mlp"]))
    outer = next(m for n, m in peft_model.named_modules() if n.endswith("mlp.experts")
                 and type(m).__name__ == "ParamWrapper")
    for wrapper in (outer, outer.base_layer):
        delta = wrapper.get_delta_weight("default")  # [E, out, in]
        num_experts, out_features, in_features = delta.shape
        a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        slots = ExpertLoraSlots(num_experts, in_features, out_features, torch.device("cpu"), torch.float32)
        slots.load_slot(3, a, b, wrapper.scaling["default"])
        experts = [e for e in range(num_experts) for _ in range(3)]  # three pairs per expert, sorted
        x = torch.randn(len(experts), in_features)
        y = torch.zeros(len(experts), out_features)
        slots.add_deltas(y, x, {3: SlotRows(list(range(len(experts))), experts, torch.device("cpu"))})
        expected = torch.stack([x[i] @ delta[e].T for i, e in enumerate(experts)])
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        y = torch.zeros(len(experts), out_features)
        slots.add_deltas(y, x, {2: SlotRows([0, 1], [0, 0], torch.device("cpu"))})
        assert not y.any(), "a slot without factors adds nothing"


@pytest.mark.parametrize("bag_rows", [0, 10**6], ids=["matmul-per-expert", "per-pair-bags"])
def test_rows_only_meet_their_own_slot(monkeypatch, bag_rows):
    monkeypatch.setattr(expert_layers, "BAG_ROWS_PER_EXPERT", bag_rows)
    slots = ExpertLoraSlots(2, 4, 3, torch.device("cpu"), torch.float32)
    slots.load_slot(1, torch.full((2 * 2, 4), float("nan")), torch.ones(3, 2 * 2), 1.0)
    slots.load_slot(2, torch.ones(2 * 2, 4), torch.ones(3, 2 * 2), 0.5)
    y = torch.zeros(4, 3)
    cpu = torch.device("cpu")
    slots.add_deltas(y, torch.ones(4, 4), {1: SlotRows([0], [1], cpu), 2: SlotRows([2, 3], [0, 1], cpu)})
    assert torch.isnan(y[0]).all() and not y[1].any() and torch.equal(y[2:], torch.full((2, 3), 4.0))
    slots.clear_slot(1)
    assert 1 not in slots.factors and slots.rank(2) == 2


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_both_paths_give_the_same_tokens(base_dirs, expert_adapters, monkeypatch, arch):
    """Decode and prefill forced through each path: the same greedy tokens (PEFT's, above)."""
    adapters = expert_adapters[arch]
    runs = []
    for bag_rows in (0, 10**6):
        monkeypatch.setattr(expert_layers, "BAG_ROWS_PER_EXPERT", bag_rows)
        runs.append([tokens for *_, tokens in _serve(base_dirs[arch], "nf4", adapters)])
    assert runs[0] == runs[1]


def test_expert_slots_are_allocated_per_adapter_and_freed_with_it(base_dirs, expert_adapters):
    adapters = expert_adapters["deepseek-v2"]
    with running_engine(base_dirs["deepseek-v2"], "nf4", max_loras=3) as engine:
        model = engine.loaded_base.model
        assert model.config._experts_implementation == IMPLEMENTATION
        experts = [m._loraserve_lora for _, m in model.named_modules() if hasattr(m, "_loraserve_lora")]
        assert experts and not any(s.factors for e in experts for s in e.slots.values())
        assert set(engine.base.lora_expert_shapes) == {f"{n}.{p}" for n, m in model.named_modules()
                                                      if hasattr(m, "_loraserve_lora") for p in EXPERT_WEIGHTS}
        engine.add_adapter("mlp", adapters["mlp"])
        prompt = engine.encode(PROMPTS[0])
        collect(engine.submit(greedy_request(prompt, 2, "mlp")))
        loaded = [s for e in experts for s in e.slots.values() if s.factors]
        assert len(loaded) == 2 * len(experts) and {s.rank(next(iter(s.factors))) for s in loaded} == {4, 8}
        engine.remove_adapter("mlp")
        collect(engine.submit(greedy_request(prompt, 1)))
        assert not any(s.factors for e in experts for s in e.slots.values()), "a removed adapter's factors are freed"


def test_adapters_the_engine_cannot_serve_on_experts_are_refused(base_dirs, expert_adapters, tmp_path):
    adapters = expert_adapters["deepseek-v3"]
    config = EngineConfig(base=BaseModelConfig(str(base_dirs["deepseek-v3"]), quantization="none"),
                          target_modules=("q_a_proj", "o_proj"))
    restricted = NativeEngine.load(config)
    with pytest.raises(AdapterIncompatible) as info:
        restricted.check_adapter("mlp", adapters["mlp"])
    assert "routed MoE experts" in info.value.message and "target_modules" in info.value.message

    # Two parameters' tensors under a config that targets one: which is which cannot be known.
    lying = tmp_path / "lying"
    lying.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (lying / name).write_bytes((adapters["mlp"] / name).read_bytes())
    config = json.loads((lying / "adapter_config.json").read_text())
    config["target_parameters"] = ["down_proj"]
    (lying / "adapter_config.json").write_text(json.dumps(config))
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(str(base_dirs["deepseek-v3"]), quantization="none")))
    with pytest.raises(AdapterIncompatible) as info:
        engine.check_adapter("lying", lying)
    assert "target_parameters" in info.value.message and "experts.base_layer" in info.value.message


def test_an_expert_adapter_that_does_not_fit_fails_alone(base_dirs, expert_adapters, monkeypatch):
    """Expert factors are allocated on load; when memory runs out there (injected here: a CPU
    host cannot be brought to a real accelerator OOM), only that adapter's request fails, with
    RESOURCE_EXHAUSTED, nothing of it stays in the slot, and it loads once memory is back."""
    adapters = expert_adapters["deepseek-v3"]
    real_load = ExpertLoraSlots.load_slot
    full = {"on": True}

    def load_slot(self, slot, a, b, scaling):
        if a is not None and full["on"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.65 GiB")
        real_load(self, slot, a, b, scaling)

    monkeypatch.setattr(ExpertLoraSlots, "load_slot", load_slot)
    with running_engine(base_dirs["deepseek-v3"], "nf4", {"mlp": adapters["mlp"], "att": adapters["att"]},
                        max_loras=2) as engine:
        prompt = engine.encode(PROMPTS[0])
        streams = [engine.submit(greedy_request(prompt, 6, a)) for a in ("mlp", "att", None)]
        with pytest.raises(ResourceExhausted, match="'mlp'.*does not fit in accelerator memory"):
            collect(streams[0])
        alone = [collect(s)[1].token_ids for s in streams[1:]]
        slots = engine._scheduler.slots
        assert slots.slot_of(next(e.version for e in engine.adapters() if e.adapter_id == "mlp")) is None
        free = set(range(1, slots.max_loras + 1)) - set(slots._slot_of.values())
        assert free and not any(layer.holds(s) for layer in slots._layers.values() for s in free)
        full["on"] = False
        again = [collect(engine.submit(greedy_request(prompt, 6, a)))[1].token_ids for a in ("mlp", "att", None)]
    assert again[1:] == alone
    assert len(again[0]) == 6 and again[0] != again[2], "the expert adapter is served once it fits"


def test_an_idle_batchs_kept_kv_is_given_back_when_an_expert_adapter_needs_the_memory(
        base_dirs, expert_adapters, monkeypatch):
    """An emptied batch keeps its KV buffers for the next one; when an adapter's expert factors
    do not fit while the batch is empty, those buffers are freed and the load tried again
    (injected: the load runs out of memory while the KV buffers are held)."""
    adapters = expert_adapters["deepseek-v3"]
    real_load = ExpertLoraSlots.load_slot
    with running_engine(base_dirs["deepseek-v3"], "nf4", {"mlp": adapters["mlp"]}, max_loras=2) as engine:
        cache = engine._scheduler.runner.cache
        engine._scheduler.kv_release_idle_s = 3600.0

        def load_slot(self, slot, a, b, scaling):
            if a is not None and cache.allocated:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.65 GiB")
            real_load(self, slot, a, b, scaling)

        monkeypatch.setattr(ExpertLoraSlots, "load_slot", load_slot)
        prompt = engine.encode(PROMPTS[0])
        collect(engine.submit(greedy_request(prompt, 4)))
        assert engine._on_engine(lambda: cache.allocated)  # kept after the batch emptied
        _, out = collect(engine.submit(greedy_request(prompt, 6, "mlp")))
        assert out.completion_tokens == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bag_rows", [0, 10**6], ids=["matmul-per-expert", "per-pair-bags"])
def test_expert_slots_on_cuda_in_bf16(monkeypatch, bag_rows):
    """The two paths on a GPU in the production dtype, against a float64 product."""
    monkeypatch.setattr(expert_layers, "BAG_ROWS_PER_EXPERT", bag_rows)
    cuda = torch.device("cuda")
    experts, in_features, out_features, r = 8, 256, 384, 16
    slots = ExpertLoraSlots(experts, in_features, out_features, cuda, torch.bfloat16)
    a, b = torch.randn(experts * r, in_features) * 0.1, torch.randn(out_features, experts * r) * 0.1
    slots.load_slot(2, a, b, 2.0)
    routed = [e for e in range(experts) for _ in range(1 + e % 3)]  # sorted by expert
    x = torch.randn(len(routed), in_features)
    y = torch.zeros(len(routed), out_features, device=cuda, dtype=torch.bfloat16)
    slots.add_deltas(y, x.to(cuda, torch.bfloat16), {2: SlotRows(list(range(len(routed))), routed, cuda)})
    a_e = a.double().reshape(experts, r, in_features)
    b_e = b.double().reshape(out_features, r, experts)
    expected = torch.stack([2.0 * (x[i].double() @ a_e[e].T) @ b_e[:, :, e].T for i, e in enumerate(routed)])
    torch.testing.assert_close(y.double().cpu(), expected, atol=5e-2, rtol=5e-2)


def test_the_vllm_engine_refuses_expert_adapters_saying_which_engine_serves_them(base_dirs, expert_adapters):
    """The vllm engine's own check (its adapter half, no vLLM started): refused before anything
    is published, naming the native engine."""
    from loraserve.engine.vllm_engine_adapters import VllmAdapterMethods
    from loraserve.engine.vllm_setup import read_base_facts

    base = BaseModelConfig(str(base_dirs["deepseek-v3"]), quantization="none")
    checker = VllmAdapterMethods()
    checker._facts, checker.config = read_base_facts(base), EngineConfig(base=base)
    assert checker.check_adapter("att", expert_adapters["deepseek-v3"]["att"]).modules  # attention only: fine
    with pytest.raises(AdapterIncompatible) as info:
        checker.check_adapter("mlp", expert_adapters["deepseek-v3"]["mlp"])
    assert "routed MoE experts" in info.value.message and "native engine" in info.value.message
