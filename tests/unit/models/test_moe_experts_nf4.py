"""Routed MoE experts in 4-bit per expert (loraserve.base.moe_experts): storage, bytes, the
forward's semantics against DeepseekV3Experts.forward, accuracy against the dense layers' NF4
alone, generation, training through them, and the bytes on the published DeepSeek configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from bitsandbytes.functional import dequantize_4bit
from transformers import AutoConfig, AutoModelForCausalLM

import loraserve.base.loading as loading
from loraserve.base.loading import load_base
from loraserve.base.memory_plan import model_shapes, weight_parts
from loraserve.base.moe_experts import (
    EXPERT_WEIGHTS,
    IMPLEMENTATION,
    _expert_quant_state,
    routed_experts_modules,
    weight_bytes,
)
from loraserve.config import BaseModelConfig
from loraserve.devtools.synthetic_base import init_model

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "real_configs"
ARCHS = ("deepseek-v2", "deepseek-v3")
# nf4 with double quant, per element: half a byte of codes, a uint8 absmax per 64-block and an
# fp32 absmax2 per 256 blocks; against fp32 (4 bytes) that is a factor of ~0.129.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
PROMPT = [[1, 5, 9, 20, 33, 7, 8, 100, 42, 17, 300, 2]]


def fourbit_bytes(numel: int, blocksize: int = 64) -> int:
    """bitsandbytes' 4-bit storage of one matrix with double quant, as bitsandbytes documents it:
    codes, a uint8 absmax per block, an fp32 absmax2 per 256 blocks and one fp32 offset."""
    blocks = math.ceil(numel / blocksize)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / 256) + 4


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: init_model(root / arch, arch, "tiny", seed=3) for arch in ARCHS}


def _load(base: Path, quantization: str, experts: bool = True, monkeypatch=None):
    """load_base; with experts=False the routed experts are left as bitsandbytes alone leaves them."""
    if not experts:
        monkeypatch.setattr(loading, "quantize_routed_experts", lambda *args: 0)
    try:
        return load_base(BaseModelConfig(str(base), quantization=quantization)).model
    finally:
        if not experts:
            monkeypatch.undo()


@torch.inference_mode()
def _logits(model) -> torch.Tensor:
    return model(input_ids=torch.tensor(PROMPT)).logits.float()  # [1, L, V]


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_quantizes_every_routed_expert_and_frees_the_fused_weights(bases, arch, single_threaded_torch):
    fp = _load(bases[arch], "none")
    model = _load(bases[arch], "nf4")
    assert model.config._experts_implementation == IMPLEMENTATION
    (_, fused), = routed_experts_modules(fp)
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    assert not [n for n, _ in model.named_parameters() if ".experts." in n and "shared" not in n]
    expected = fp32 = 0
    for name in EXPERT_WEIGHTS:
        dense = getattr(fused, name)  # [E, out, in]
        packed = getattr(experts, f"{name}_packed")
        assert packed.dtype == torch.uint8 and packed.shape == (dense.shape[0], dense[0].numel() // 2)
        assert _expert_quant_state(experts, name, 0).quant_type == "nf4"
        expected += dense.shape[0] * fourbit_bytes(dense[0].numel()) + 4 * (16 + 256)
        fp32 += dense.numel() * 4
    stored = sum(b.numel() * b.element_size() for n, b in experts.named_buffers())
    assert stored == expected
    # past the shared code tables (~1 KiB a matrix), the 4-bit factor against fp32: ~0.129
    per_expert = stored - len(EXPERT_WEIGHTS) * 4 * (16 + 256)
    assert math.isclose(per_expert / fp32, NF4_BYTES / 4, rel_tol=0.01), per_expert / fp32


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_the_eager_experts_forward_on_the_dequantized_weights(bases, arch, single_threaded_torch):
    model = _load(bases[arch], "nf4")
    (_, experts), = routed_experts_modules(_load(bases[arch], "none"))  # for the class's eager forward
    module = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    eager = type(experts).forward.__wrapped__
    torch.manual_seed(0)
    hidden = torch.randn(9, model.config.hidden_size)  # [T, H]
    top_k_index = torch.stack([torch.randperm(4)[:2] for _ in range(9)])  # [T, K], experts 0..3
    top_k_weights = torch.rand(9, 2)  # [T, K]
    for name in EXPERT_WEIGHTS:
        n = module._fourbit_meta["num_experts"]
        weights = [dequantize_4bit(getattr(module, f"{name}_packed")[e].view(-1, 1), _expert_quant_state(module, name, e))
                   for e in range(n)]
        setattr(experts, name, torch.nn.Parameter(torch.stack(weights)))
    experts.requires_grad_(False)
    want_in, got_in = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    want = eager(experts, want_in, top_k_index, top_k_weights)
    got = module(got_in, top_k_index, top_k_weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # gradients reach the activations through the 4-bit matmuls (what training needs)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_stay_as_close_to_fp_as_the_dense_nf4_alone(bases, arch, monkeypatch, single_threaded_torch):
    fp = _logits(_load(bases[arch], "none"))
    dense_only = (_logits(_load(bases[arch], "nf4", experts=False, monkeypatch=monkeypatch)) - fp).abs().mean()
    with_experts = (_logits(_load(bases[arch], "nf4")) - fp).abs().mean()
    assert 0 < with_experts < 2 * dense_only, (with_experts, dense_only)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_runs_on_4bit_experts(bases, arch, single_threaded_torch):
    model = _load(bases[arch], "nf4")
    ids = torch.tensor(PROMPT)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                         eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 5)


def test_training_flows_gradients_through_4bit_experts(bases, single_threaded_torch):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    base = load_base(BaseModelConfig(str(bases["deepseek-v3"]), quantization="nf4"), for_training=True).model
    model = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj", "kv_b_proj"]))
    ids = torch.tensor(PROMPT)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # lora_B (zero-initialised A's partner) has gradients once any flow; layer 0 sits below the MoE
    layer0 = [g for n, g in grads.items() if "layers.0." in n and "lora_B" in n]
    assert layer0 and all(g is not None and g.abs().sum() > 0 for g in layer0)
    assert not any(b.requires_grad for n, b in model.named_buffers() if "_packed" in n)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_memory_plan_is_the_loaded_models_bytes_exactly(bases, arch, single_threaded_torch):
    """`loraserve plan`'s accounting (memory_plan.weight_parts, from config.json on the meta
    device) equals the bytes the loaded NF4 model holds, 4-bit experts included."""
    model = _load(bases[arch], "nf4")
    parts = weight_parts(model_shapes(bases[arch]), "nf4", "float32", max_loras=0, max_lora_rank=0)
    assert weight_bytes(model) == sum(p.bytes for p in parts)


def test_deepseek_v2_lite_nf4_with_experts_is_about_8_7_gb(tmp_path):
    c = json.loads((FIXTURES / "deepseek-v2-lite.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(c))
    hf_config = AutoConfig.for_model(**c)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    h, vocab = c["hidden_size"], c["vocab_size"]
    moe_layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
    experts = moe_layers * c["n_routed_experts"] * 3 * h * c["moe_intermediate_size"]
    embeddings = 2 * vocab * h  # embed_tokens and the untied lm_head stay bf16
    total = sum(p.numel() for p in meta.parameters())
    norms_and_routers = sum(p.numel() for n, p in meta.named_parameters() if n.endswith(("norm.weight", "gate.weight")))
    dense = total - experts - embeddings - norms_and_routers
    expected = (experts + dense) * NF4_BYTES + 2 * (embeddings + norms_and_routers)
    parts = {p.name: p for p in weight_parts(model_shapes(tmp_path), "nf4", "bfloat16", max_loras=0, max_lora_rank=0)}
    got = sum(p.bytes for p in parts.values())
    assert math.isclose(got, expected, rel_tol=0.01) and 8.5e9 < got < 8.9e9, (got, expected)
    assert parts["routed experts"].params == experts
    dense_only = got - parts["routed experts"].bytes + experts * 2  # bitsandbytes alone leaves them bf16
    assert math.isclose(dense_only, expected + experts * (2 - NF4_BYTES), rel_tol=0.01) and dense_only > 3e10


def test_fp4_experts_use_fp4(bases, single_threaded_torch):
    model = _load(bases["deepseek-v3"], "fp4")
    module = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    assert _expert_quant_state(module, "down_proj", 1).quant_type == "fp4"
    assert _logits(model).isfinite().all()


def test_int8_and_dense_models_are_left_as_they_are(bases, tmp_path, single_threaded_torch):
    from transformers import BitsAndBytesConfig

    from loraserve.base.moe_experts import quantize_routed_experts

    moe = _load(bases["deepseek-v2"], "none")
    assert quantize_routed_experts(moe, "int8", BitsAndBytesConfig(load_in_8bit=True)) == 0
    assert routed_experts_modules(moe) and moe.config._experts_implementation != IMPLEMENTATION
    dense = _load(init_model(tmp_path / "llm", "deepseek-llm", "tiny", seed=0), "nf4")
    assert not routed_experts_modules(dense) and dense.config._experts_implementation != IMPLEMENTATION
