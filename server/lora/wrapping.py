"""Finds the base's linears that can carry LoRA and wraps each once with `MultiLoraLinear`."""

from __future__ import annotations

import torch
from torch import nn

from loraserve.lora import row_kernel
from loraserve.lora.batch_context import LoraBatchContext
from loraserve.lora.layers import MultiLoraLinear, wrappable_linear_types

# Modules an adapter may never target, with the reason given to the user.
UNSUPPORTED_MODULES = {
    "lm_head": "the output head (lm_head) is shared by every request",
    "embed_tokens": "the token embedding is shared by every request",
    "experts": "routed MoE experts take LoRA only as PEFT target_parameters on their fused gate_up_proj / "
               "down_proj, which the native engine serves (unless its target_modules leave them out)",
    "gate": "the MoE router decides expert placement for every request",
}


def supported_linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Full module name -> linear module for every linear inside the decoder layers that an
    adapter may target (attention projections, dense MLPs, shared experts)."""
    types = wrappable_linear_types()
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, types) or isinstance(module, MultiLoraLinear):
            continue
        parts = name.split(".")
        if "layers" not in parts or any(p in UNSUPPORTED_MODULES for p in parts):
            continue
        found[name] = module
    return found


def wrap_model(model: nn.Module, num_slots: int, max_rank: int, context: LoraBatchContext,
               dtype: torch.dtype, target_modules: tuple[str, ...] | None = None) -> dict[str, MultiLoraLinear]:
    """Replace every supported linear (or those whose last name component is in
    `target_modules`) with a `MultiLoraLinear` holding `num_slots` slots; returns them by name."""
    wrapped: dict[str, MultiLoraLinear] = {}
    context.num_slots = num_slots
    for name, module in supported_linear_names(model).items():
        if target_modules is not None and name.rsplit(".", 1)[-1] not in target_modules:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MultiLoraLinear(module, num_slots, max_rank, context, dtype)
        setattr(parent, child, layer)
        wrapped[name] = layer
    if not wrapped:
        raise ValueError("the base model has no linear layer that can carry LoRA adapters")
    if any(layer._row_kernel for layer in wrapped.values()):
        row_kernel.warm_up()  # compiled (or read from numba's cache) now, not by the first request
    return wrapped
