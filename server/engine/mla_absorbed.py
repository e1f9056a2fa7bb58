"""Absorbed MLA decode for DeepSeek-V2/V3: a decode step's attention over the cached latent,
never re-expanding the context through kv_b_proj.

transformers' DeepseekV2/V3 attention already caches the latent (kv_a_layernorm(compressed_kv)
[B, 1, T, kv_lora_rank] as "keys", rotated k_pe [B, 1, T, rope] as "values"), but every step it
runs kv_b_proj over the whole context to expand keys and values: the linear cost grows with T.
Here, for a one-token step, kv_b_proj's weight is split per head into its key part W_UK
[H, nope, L] and value part W_UV [H, v, L] and absorbed (as in DeepSeek's reference code, vLLM,
SGLang):

    q_lat  = q_nope @ W_UK                               # [B, H, L]
    scores = (q_lat @ c^T + q_pe @ k_pe^T) * scaling     # [B, H, T], + mask
    out    = (softmax(scores) @ c) @ W_UV^T              # [B, H, v] -> o_proj

`scaling` is the module's own (transformers' yarn mscale adjustment included). The cache layout
is unchanged, so prefill, chunked prefill, prefix caching and kv_bytes_per_token are untouched.

LoRA on kv_b_proj is absorbed too, per row and kept low-rank: with the slot's A [L, R] and B
(scaling folded in) split into its key part B_k [R, H, nope] and value part B_v [R, H, v],

    q_lat += (q_nope @ B_k^T) @ A^T        out += (out_lat @ A) @ B_v

so every row takes the same path whatever its batch mates (a whole-batch fallback would make a
request's numbers depend on them). Adapters on every other module act before or after
kv_b_proj's weights and need nothing here.

Memory: one copy of kv_b_proj's weight per layer in the compute dtype (read once through the
base layer when it is quantized), H * (nope + v) * L elements: in bf16 4 MiB per layer at
DeepSeek-V2-Lite's dims (16 heads), 32 MiB per layer (about 2 GiB over 61 layers) at
DeepSeek-V3's (128 heads). Bitsandbytes bases are absorbed only when asked (install_absorbed_mla).
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from loraserve.base.quantization import MLA_MODEL_TYPES


def _dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """kv_b_proj's weight [out, in] in `dtype`, read through the base layer's own forward on the
    identity: exact for nn.Linear and whatever bitsandbytes does to its 4-bit or 8-bit weight
    (on CPU it repacks NF4 into a layout dequantize_4bit does not read), done once per layer."""
    base = getattr(linear, "base_layer", linear)  # MultiLoraLinear wraps the base linear
    device = next(base.parameters()).device
    eye = torch.eye(base.in_features, dtype=dtype, device=device)  # [in, in]
    zero = torch.zeros(1, base.in_features, dtype=dtype, device=device)
    return (base(eye) - base(zero)).t().contiguous()  # [out, in], any bias taken out


class AbsorbedMla:
    """Replaces one attention module's forward: one-token steps with a cache are absorbed, the
    rest go to the original forward."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.original = attn.forward
        self._signature = inspect.signature(self.original)
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None  # W_UK [H, nope, L], W_UV [H, v, L]
        self._dtype: torch.dtype | None = None
        self.steps = 0
        """Absorbed one-token forwards run so far (what tests check the path was taken by)."""
        module = sys.modules[type(attn).__module__]
        self._v2 = hasattr(module, "apply_rotary_emb")
        self._rope = module.apply_rotary_emb if self._v2 else (
            module.apply_rotary_pos_emb_interleave if getattr(attn.config, "rope_interleave", False)
            else module.apply_rotary_pos_emb)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None or self._dtype != dtype:
            a = self.attn
            w = _dense_weight(a.kv_b_proj, dtype).view(a.num_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)  # [H, nope+v, L]
            self._weights = (w[:, :a.qk_nope_head_dim].contiguous(), w[:, a.qk_nope_head_dim:].contiguous())
            self._dtype = dtype
        return self._weights

    def _kv_b_lora(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Each row's kv_b_proj adapter, when any row has one: A [B, L, R], B's key part
        [B, R, H, nope] and value part [B, R, H, v] (scaling folded in; zeros for no adapter)."""
        kv_b, a = self.attn.kv_b_proj, self.attn
        context = getattr(kv_b, "context", None)
        if context is None or not context.any_active or not any(kv_b.ranks[s] for s in context.slots):
            return None
        slots = torch.tensor(context.slots, device=kv_b.lora_a.device)  # [B]
        index = (slots - 1).clamp(min=0)
        keep = (slots > 0).to(kv_b.lora_a.dtype)[:, None, None]  # slot 0: no adapter
        lora_a = kv_b.lora_a[index] * keep  # [B, L, R]
        lora_b = kv_b.lora_b[index].view(batch, kv_b.max_rank, a.num_heads, -1)  # [B, R, H, nope+v]
        return lora_a, lora_b[..., :a.qk_nope_head_dim], lora_b[..., a.qk_nope_head_dim:]

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        call = bound.arguments
        extra = call.get("kwargs", {})
        hidden = call["hidden_states"]
        cache = call.get("past_key_values")
        if hidden.shape[1] != 1 or cache is None:
            return self.original(*args, **kwargs)
        self.weights(hidden.dtype)
        return self.decode(hidden, call.get("position_embeddings"), call.get("attention_mask"), cache, extra)

    def decode(self, hidden: torch.Tensor, position_embeddings, attention_mask: torch.Tensor | None,
               cache, extra: dict) -> tuple[torch.Tensor, None]:
        """One token per row: absorbed attention, the latent written to `cache` as transformers does."""
        a = self.attn
        batch = hidden.shape[0]
        self.steps += 1
        w_uk, w_uv = self._weights
        if a.q_lora_rank is None:
            q = a.q_proj(hidden)
        else:
            q = a.q_b_proj(a.q_a_layernorm(a.q_a_proj(hidden)))
        q = q.view(batch, 1, a.num_heads, a.qk_head_dim).transpose(1, 2)  # [B, H, 1, nope+rope]
        q_nope, q_pe = torch.split(q, [a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        compressed = a.kv_a_proj_with_mqa(hidden)  # [B, 1, L+rope]
        c_new, k_pe = torch.split(compressed, [a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        c_new = a.kv_a_layernorm(c_new).view(batch, 1, 1, a.kv_lora_rank)  # [B, 1, 1, L]
        k_pe = k_pe.view(batch, 1, 1, a.qk_rope_head_dim)  # [B, 1, 1, rope]
        if self._v2:
            q_pe, k_pe = self._rope(q_pe, k_pe, position_embeddings.to(q_pe.device))
        else:
            cos, sin = position_embeddings
            q_pe, k_pe = self._rope(q_pe, k_pe, cos, sin)
        c, k_pe = cache.update(c_new, k_pe, a.layer_idx)  # [B, 1, T, L], [B, 1, T, rope]
        # Heads fold into the query axis: one [H, L] x [L, T] product per row, the latent never
        # broadcast (a [B, H, 1, L] @ [B, 1, L, T] matmul would copy it once per head).
        c2, pe2 = c[:, 0], k_pe[:, 0]  # [B, T, L], [B, T, rope]
        q_nope = q_nope[:, :, 0]  # [B, H, nope]
        q_lat = torch.einsum("bhd,hdl->bhl", q_nope, w_uk)  # [B, H, L]
        lora = self._kv_b_lora(batch)
        if lora is not None:  # W_UK' = W_UK + (B_k A^T) per row's slot, kept low-rank
            lora_a, lora_bk, lora_bv = lora
            q_lat = q_lat + torch.einsum("bhr,blr->bhl", torch.einsum("bhd,brhd->bhr", q_nope, lora_bk), lora_a)
        scores = (q_lat @ c2.transpose(1, 2) + q_pe[:, :, 0] @ pe2.transpose(1, 2)) * a.scaling  # [B, H, T]
        if attention_mask is not None:
            mask = attention_mask[:, 0, -1:, :c2.shape[1]]  # [B, 1, T]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(c2.dtype)  # [B, H, T]
        out_lat = probs @ c2  # [B, H, L]
        out = torch.einsum("bhl,hvl->bhv", out_lat, w_uv)  # [B, H, v]
        if lora is not None:  # W_UV' = W_UV + (B_v A^T) per row's slot
            out = out + torch.einsum("bhr,brhv->bhv", torch.einsum("bhl,blr->bhr", out_lat, lora_a), lora_bv)
        out = out.reshape(batch, 1, a.num_heads * a.v_head_dim)  # [B, 1, H*v]
        return a.o_proj(out), None


def _is_quantized(linear: nn.Module) -> bool:
    weight = getattr(linear, "base_layer", linear).weight
    return getattr(weight, "quant_state", None) is not None or weight.dtype in (torch.int8, torch.uint8)


def install_absorbed_mla(model: nn.Module, quantized: bool = False) -> int:
    """Give every MLA attention module of a DeepSeek-V2/V3 `model` the absorbed decode; returns
    how many modules it was installed on (0 for other model types).

    `quantized`: also where kv_b_proj is bitsandbytes-quantized. Off by default: on a CPU with
    AVX512-BF16, bitsandbytes 0.50's inference path repacks a 4-bit weight on its first forward,
    turns its absmax to bfloat16 and computes in bfloat16 (inputs rounded, outputs bf16-exact)
    whatever the compute dtype, so the unabsorbed path rounds the expanded keys and values to
    bfloat16 while the absorbed one stays fp32 on the same weight (~0.3% of kv_b_proj's output).
    That moves greedy tokens at near-ties on the tiny test bases, which are held token for token
    to PEFT (tests/unit/engine/test_engine_correctness.py). With that bfloat16 path off (fp32
    arithmetic on the same 4-bit weights), absorbed equals unabsorbed to fp32 tolerance
    (test_mla_absorbed.py)."""
    if getattr(model.config, "model_type", None) not in MLA_MODEL_TYPES:
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "kv_b_proj") and hasattr(module, "kv_a_layernorm") \
                and not isinstance(module.__dict__.get("forward"), AbsorbedMla) \
                and (quantized or not _is_quantized(module.kv_b_proj)):
            module.forward = AbsorbedMla(module)
            count += 1
    return count


def remove_absorbed_mla(model: nn.Module) -> None:
    """Undo `install_absorbed_mla` (every module back to transformers' forward)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), AbsorbedMla):
            del module.forward
