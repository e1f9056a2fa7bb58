"""Routed MoE experts in bitsandbytes 4-bit (nf4/fp4), one quantized block set per expert.

transformers 5 fuses DeepSeek-V2/V3's routed experts into two 3-D Parameters per layer
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]). bitsandbytes only replaces nn.Linear, so
with `--quantization nf4` alone the experts, nearly all of an MoE's weights, stay at the compute
dtype (DeepSeek-V2-Lite: ~30 GB instead of ~9 GB). After loading, `quantize_routed_experts`
quantizes each expert's matrices with `bitsandbytes.functional.quantize_4bit` (the dense
layers' quant_type, blocksize and double quant), frees the fused Parameters and switches the
model to the `loraserve_4bit` experts implementation registered below.

Storage per experts module, for each of gate_up_proj / down_proj (buffers, so they follow
`.to()` and are counted by `weight_bytes`):
    {name}_packed  uint8 [E, n/2]       two 4-bit codes a byte, n = out * in
    {name}_absmax  [E, n/64]            uint8 with double quant (else fp32)
    {name}_absmax2 fp32 [E, n/64/256]   double quant only, with {name}_offset fp32 [E]
    {name}_code / {name}_code2          the 4-bit code (16) and the nested code (256), shared
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

log = logging.getLogger(__name__)

IMPLEMENTATION = "loraserve_4bit"
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
MOE_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def _expert_quant_state(module: nn.Module, name: str, expert: int):
    """The bitsandbytes QuantState of one expert's `name` matrix, over views of the buffers
    (rebuilt per call, so it always points at the buffers' current device)."""
    from bitsandbytes.functional import QuantState

    meta = module._fourbit_meta
    state2 = None
    if meta["nested"]:
        state2 = QuantState(absmax=getattr(module, f"{name}_absmax2")[expert], code=getattr(module, f"{name}_code2"),
                            blocksize=meta["nested_blocksize"], dtype=torch.float32)
    return QuantState(absmax=getattr(module, f"{name}_absmax")[expert], shape=meta["shapes"][name],
                      code=getattr(module, f"{name}_code"), blocksize=meta["blocksize"],
                      quant_type=meta["quant_type"], dtype=meta["dtype"],
                      offset=getattr(module, f"{name}_offset")[expert] if meta["nested"] else None, state2=state2)


def expert_linear(module: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ W[expert].T -> [T, out] for one routed expert's `name` matrix (gate_up_proj or
    down_proj), whether the experts are stored fused at the compute dtype or in 4-bit here."""
    if hasattr(module, "_fourbit_meta"):
        return _linear_4bit(module, name, expert, x)
    return nn.functional.linear(x, getattr(module, name)[expert])


def _linear_4bit(module: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ W[expert].T -> [T, out], W dequantized block-wise by bitsandbytes; gradients
    flow to x (MatMul4Bit), never to the frozen codes."""
    import bitsandbytes as bnb

    packed = getattr(module, f"{name}_packed")[expert].view(-1, 1)  # [n/2, 1], as Params4bit stores it
    state = _expert_quant_state(module, name, expert)
    return bnb.matmul_4bit(x.to(state.dtype), packed.t(), quant_state=state)


def fourbit_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor,
                            extra: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DeepseekV3Experts.forward (same for V2) over per-expert 4-bit storage: only the experts
    some token routed to are dequantized, so a decode step reads top_k experts' blocks per token.
    `extra(name, expert, x)`, when given, is added to each matrix's output (the trainer's LoRA).

    hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]
    """
    final = torch.zeros_like(hidden_states)  # [T, H]
    num_experts = self._fourbit_meta["num_experts"]
    with torch.no_grad():
        hit = torch.unique(top_k_index[(top_k_index >= 0) & (top_k_index < num_experts)]).tolist()
    for expert in hit:
        token_idx, top_k_pos = torch.where(top_k_index == expert)  # [n], [n]
        current = hidden_states[token_idx]  # [n, H]
        projected = _linear_4bit(self, "gate_up_proj", expert, current)  # [n, 2I]
        if extra is not None:
            projected = projected + extra("gate_up_proj", expert, current).to(projected.dtype)
        hidden = self._apply_gate(projected)  # [n, I]
        out = _linear_4bit(self, "down_proj", expert, hidden)  # [n, H]
        if extra is not None:
            out = out + extra("down_proj", expert, hidden).to(out.dtype)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


# The experts interface dispatches on config._experts_implementation and hands the function the
# module itself, so it carries our per-expert storage without replacing any forward.
ExpertsInterface.register(IMPLEMENTATION, fourbit_experts_forward)


def routed_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each fused routed-experts module: the ones holding 3-D gate_up_proj."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3]


def fourbit_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each routed-experts module quantized here (`quantize_routed_experts`)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "_fourbit_meta")]


def _quantize_module(module: nn.Module, quant: BitsAndBytesConfig) -> None:
    """Replace `module`'s fused gate_up_proj/down_proj Parameters by per-expert 4-bit buffers."""
    from bitsandbytes.functional import quantize_4bit

    nested = bool(quant.bnb_4bit_use_double_quant)
    meta = {"nested": nested, "quant_type": quant.bnb_4bit_quant_type, "shapes": {},
            "num_experts": module.gate_up_proj.shape[0], "dtype": module.gate_up_proj.dtype}
    # BitsAndBytesConfig has no blocksize field: Linear4bit (Params4bit) uses bitsandbytes' default, 64.
    blocksize = 64
    for name in EXPERT_WEIGHTS:
        fused = getattr(module, name).detach()  # [E, out, in]
        states, packed = [], []
        for expert in range(fused.shape[0]):
            codes, state = quantize_4bit(fused[expert], blocksize=blocksize, compress_statistics=nested,
                                         quant_type=meta["quant_type"], quant_storage=torch.uint8)
            packed.append(codes.view(-1))
            states.append(state)
        first = states[0]
        meta.update(blocksize=first.blocksize, shapes={**meta["shapes"], name: first.shape})
        delattr(module, name)  # drop the fused Parameter before the buffers grow
        module.register_buffer(f"{name}_packed", torch.stack(packed))  # [E, n/2]
        module.register_buffer(f"{name}_absmax", torch.stack([s.absmax for s in states]))
        module.register_buffer(f"{name}_code", first.code)
        if nested:
            meta["nested_blocksize"] = first.state2.blocksize
            module.register_buffer(f"{name}_absmax2", torch.stack([s.state2.absmax for s in states]))
            module.register_buffer(f"{name}_offset", torch.stack([s.offset.reshape(()) for s in states]))
            module.register_buffer(f"{name}_code2", first.state2.code)
        del fused, states, packed
    module._fourbit_meta = meta


@torch.no_grad()
def quantize_routed_experts(model: PreTrainedModel, quantization: str, quant: BitsAndBytesConfig | None) -> int:
    """Quantize a DeepSeek-V2/V3 model's routed experts like its dense layers (nf4/fp4) and
    switch it to the 4-bit experts implementation; the number of experts modules quantized.

    int8 and dense models are left as they are (bitsandbytes' int8 has no per-expert path)."""
    modules = routed_experts_modules(model)
    if not modules or quant is None:
        return 0
    if model.config.model_type not in MOE_MODEL_TYPES:
        log.info("routed experts of %s left at %s: per-expert 4-bit is built for %s", model.config.model_type,
                 modules[0][1].gate_up_proj.dtype, ", ".join(MOE_MODEL_TYPES))
        return 0
    if not quant.load_in_4bit:
        log.info("routed experts left at %s with --quantization %s: bitsandbytes int8 has no per-expert path",
                 modules[0][1].gate_up_proj.dtype, quantization)
        return 0
    if any(m.gate_up_proj.is_meta for _, m in modules):
        log.warning("routed experts left unquantized: some are offloaded (meta device), which 4-bit experts "
                    "do not support")
        return 0
    for _, module in modules:
        _quantize_module(module, quant)
    model.set_experts_implementation(IMPLEMENTATION)
    log.info("routed experts quantized to %s per expert in %d layers", quantization, len(modules))
    return len(modules)


def weight_bytes(model: nn.Module) -> int:
    """Bytes a loaded model's weights take: parameters (bitsandbytes Params4bit as packed codes
    plus their QuantState statistics) and the 4-bit experts' buffers (rotary tables are not
    weights, so other buffers are left out)."""
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, state.offset, *((state.state2.absmax, state.state2.code)
                                                                 if state.nested else ())):
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total + sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                       if name.rpartition(".")[2].startswith(EXPERT_WEIGHTS))
