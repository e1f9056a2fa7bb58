"""Absorbed MLA decode (engine/mla_absorbed.py) against transformers' unabsorbed attention: the
same greedy tokens and logits over a multi-step decode whose rows join at different steps, with
and without adapters, on tiny DeepSeek-V2/V3 bases and one with the real MLA dims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_fixtures import PROMPTS

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.synthetic_base import init_model
from loraserve.engine.mla_absorbed import AbsorbedMla, install_absorbed_mla, remove_absorbed_mla
from loraserve.engine.native import NativeEngine
from loraserve.engine.runner import ModelRunner

MLA_ARCHS = ("deepseek-v3", "deepseek-v2")
NO_KV_B = r".*\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)"
"""Every attention linear except kv_b_proj: all absorbed."""


def _absorbed_steps(model: torch.nn.Module) -> int:
    return sum(m.forward.steps for m in model.modules() if isinstance(m.__dict__.get("forward"), AbsorbedMla))


def _scenario(runner: ModelRunner, prompts: list[list[int]], slots: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Rows 0-1 prefill together, row 2 joins after 3 steps, row 3 (chunked prefill) after 6;
    row 1 leaves after 9; 11 steps in all. Returns each row's greedy tokens and every step's logits."""
    tokens: list[list[int]] = [[] for _ in prompts]
    rows: list[int] = []  # row -> prompt index
    logits_seen: list[torch.Tensor] = []

    def take(logits: torch.Tensor, which: list[int]) -> None:
        logits_seen.append(logits)
        for i, row_logits in zip(which, logits):
            tokens[i].append(int(row_logits.argmax()))

    regions = [runner.reserve(len(p) + 16) for p in prompts]
    take(runner.prefill(prompts[:2], slots[:2], regions[:2]), [0, 1])
    rows += [0, 1]
    for step in range(11):
        if step == 3:
            take(runner.prefill([prompts[2]], [slots[2]], [regions[2]]), [2])
            rows.append(2)
        if step == 6:
            runner.prefill_chunk(regions[3], prompts[3][:4], slots[3])
            logits = runner.prefill_chunk(regions[3], prompts[3][4:], slots[3])
            runner.join(regions[3])
            take(logits, [3])
            rows.append(3)
        if step == 9:
            order = runner.remove_rows({1})
            rows = [rows[j] for j in order]
        take(runner.decode([tokens[i][-1] for i in rows], [slots[i] for i in rows]), rows)
    return tokens, logits_seen


def _compare(base_dir: Path, adapters: dict[str, Path], quantization: str = "none",
             tolerance: float = 1e-4, bf16_cpu_kernel: bool = True) -> None:
    """`bf16_cpu_kernel=False`: bitsandbytes' bfloat16 CPU path is turned off (its repacking
    undone), so its 4-bit layers compute in fp32 on the same 4-bit weights."""
    quantized = quantization != "none"
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization=quantization),
                                            max_loras=2, max_lora_rank=16))
    scheduler = engine._scheduler
    model, context = scheduler.runner.model, scheduler.runner.context
    exact = not quantized or not bf16_cpu_kernel
    if not bf16_cpu_kernel:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
                weight = module.weight
                if getattr(weight.quant_state, "packing_format_for_cpu", False):
                    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    slot_ids = [0]
    for name, path in adapters.items():
        weights, _ = engine.read_adapter(name, path)
        slot_ids.append(scheduler.slots.acquire(name, weights))
    tok = engine.tokenizer
    prompts = [tok.encode(p)[:n] for p, n in zip(PROMPTS, (5, 11, 17, 9))]
    slots = [slot_ids[i % len(slot_ids)] for i in range(4)]
    with torch.inference_mode():
        remove_absorbed_mla(model)
        ref_tokens, ref_logits = _scenario(ModelRunner(model, context, mla_absorb=False), prompts, slots)
        runner = ModelRunner(model, context)
        install_absorbed_mla(model, quantized=quantized)
        steps_before = _absorbed_steps(model)
        got_tokens, got_logits = _scenario(runner, prompts, slots)
    absorbed = _absorbed_steps(model) - steps_before
    assert absorbed > 0
    assert got_tokens == ref_tokens
    rows_off = 0
    for ref, got in zip(ref_logits, got_logits):
        scale = max(1.0, ref.abs().max().item())
        rows_off += int(((got - ref).abs().amax(-1) > tolerance * scale).sum())
        if exact:
            torch.testing.assert_close(got, ref, atol=tolerance * scale, rtol=tolerance)
    # Quantized, bitsandbytes' CPU kernel computes kv_b_proj in bfloat16 over the expanded context
    # (see mla_absorbed.install_absorbed_mla) while the absorbed path works in fp32, and a near-tie
    # downstream (an MoE router's top-k) amplifies it: one row of 38 on the tiny V3 base differs by
    # 0.39 while the rest stay ~0.01.
    assert rows_off <= (0 if exact else sum(len(r) for r in ref_logits) // 20)


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_absorbed_decode_matches_unabsorbed(base_dirs, arch: str) -> None:
    _compare(base_dirs[arch], {})


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_absorbed_decode_matches_with_attention_lora(base_dirs, tmp_path: Path, arch: str) -> None:
    adapters = {"att": make_random_adapter(base_dirs[arch], tmp_path / "att", r=8, target=NO_KV_B, seed=3)}
    _compare(base_dirs[arch], adapters)


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_kv_b_proj_lora_is_absorbed(base_dirs, tmp_path: Path, arch: str) -> None:
    adapters = {"att": make_random_adapter(base_dirs[arch], tmp_path / "att", r=8, target="attention", seed=4)}
    _compare(base_dirs[arch], adapters)


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_absorbed_decode_matches_on_nf4(base_dirs, arch: str) -> None:
    """kv_b_proj read once from NF4 gives what bitsandbytes' own matmul gives, within its
    rounding (its CPU 4-bit matmul runs in bfloat16: ~0.3% of the output off an fp32 one)."""
    _compare(base_dirs[arch], {}, quantization="nf4", tolerance=1e-2)


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_absorbed_decode_on_nf4_is_exact_without_bitsandbytes_bf16_cpu_path(base_dirs, arch: str) -> None:
    """The NF4 difference above is bitsandbytes' bfloat16 arithmetic, not absorption: with its
    bfloat16 CPU path off (fp32 arithmetic on the same 4-bit weights), the absorbed decode equals
    the unabsorbed one to fp32 tolerance."""
    _compare(base_dirs[arch], {}, quantization="nf4", bf16_cpu_kernel=False)


def test_absorbed_decode_matches_at_real_mla_dims(tmp_path: Path) -> None:
    base_dir = init_model(tmp_path / "real-mla", "deepseek-v3", "tiny", seed=0, real_mla=True)
    adapters = {"att": make_random_adapter(base_dir, tmp_path / "att", r=8, target=NO_KV_B, seed=5),
                "kv-b": make_random_adapter(base_dir, tmp_path / "kv-b", r=16, target="attention", seed=6)}
    _compare(base_dir, adapters)


def test_kv_bytes_per_token_is_the_latent(base_dirs) -> None:
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dirs["deepseek-v3"]),
                                                                 quantization="none")))
    runner = engine._scheduler.runner
    cfg = runner.model.config
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4  # fp32
    assert runner.kv_bytes_per_token() == latent


def test_absorbed_decode_keeps_yarn_mscale(tmp_path: Path) -> None:
    """DeepSeek-V3's yarn rope scales softmax by mscale^2; the absorbed step uses the same scale."""
    base_dir = init_model(tmp_path / "yarn", "deepseek-v3", "tiny", seed=0)
    config = json.loads((base_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                                 "original_max_position_embeddings": 4096}
    config["max_position_embeddings"] = 4096 * 40
    (base_dir / "config.json").write_text(json.dumps(config))
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization="none")))
    attn = engine._scheduler.runner.model.model.layers[0].self_attn
    assert attn.scaling > 1.3 * attn.qk_head_dim ** -0.5  # (0.1 ln 40 + 1)^2 = 1.87
    _compare(base_dir, {})


def test_engine_absorbs_unquantized_bases_only(base_dirs) -> None:
    """The engine absorbs where kv_b_proj is dense; a bitsandbytes one keeps transformers' path
    (see install_absorbed_mla) unless asked."""
    for quantization, absorbed in (("none", True), ("nf4", False)):
        engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(model=str(base_dirs["deepseek-v3"]),
                                                                     quantization=quantization)))
        model = engine._scheduler.runner.model
        installed = [isinstance(m.__dict__.get("forward"), AbsorbedMla) for m in model.modules() if hasattr(m, "kv_b_proj")]
        assert installed and all(i == absorbed for i in installed)
