"""LoRA on DeepSeek-V2/V3's routed MoE experts, many adapters in one batch.

PEFT writes LoRA on the fused routed experts as `target_parameters` (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]): one lora_A [E * r, in] and lora_B [out, E * r] per parameter, expert e's
factors being A_e = lora_A.reshape(E, r, in)[e] and B_e = lora_B.reshape(out, r, E)[:, :, e]
(ParamWrapper.get_delta_factors), so that expert e computes x @ (W_e + scaling * B_e @ A_e).T.

Semantics of the experts forward installed here, for every (token x, routed expert e) pair of a
sequence in slot s (slot 0 = no adapter), with each parameter's own slot factors:

    g = x @ W_gate_up[e].T + (x @ A_gu[s, e]) @ B_gu[s, e]        (LoRA term only where s targets it)
    h = act(g[:I]) * g[I:]
    y = h @ W_down[e].T + (h @ A_d[s, e]) @ B_d[s, e]
    out[x] += routing_weight(x, e) * y

A is stored per slot as [E, in, r] and B as [E, r, out] with the scaling folded in, at the
adapter's own rank. Unlike the linears' slots, this storage is allocated when an adapter that
targets the parameter is loaded into a slot and freed with it: an expert LoRA is E times a
linear's (DeepSeek-V2-Lite, rank 16, both parameters: ~0.9 GB fp32 per adapter), so reserving
it for every slot of every MoE base would cost gigabytes nobody asked for.

Isolation as in `layers.py`: the rows routed to an expert are grouped by slot and each group is
multiplied by its own slot's factors only. When no sequence of the batch uses an adapter that
targets these experts, the forward is the base's own experts implementation, untouched. When
some do, every row runs through one loop over the routed experts (the 4-bit experts' own
algorithm; with unquantized experts it is transformers' eager loop, equal to its grouped_mm
kernel to float rounding). Cost: two small matmul pairs per (expert, slot) group hit.

This is our own code: PEFT's ParamWrapper merges one adapter into the whole weight per forward,
which cannot mix adapters in a batch, and vLLM's fused-MoE LoRA kernels are CUDA/Triton only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from loraserve.base.moe_experts import EXPERT_WEIGHTS, expert_linear, routed_experts_modules
from loraserve.lora.layers import LoraBatchContext

IMPLEMENTATION = "loraserve_lora"


class ExpertLoraSlots:
    """Adapter slots for one fused routed-expert parameter (gate_up_proj or down_proj) of one
    experts module; the name it is registered under is `<experts module>.<parameter>`."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.device = device
        self.dtype = dtype
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """slot -> (A [E, in, r], B [E, r, out] with the scaling folded in), only for slots whose
        adapter targets this parameter."""

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write PEFT's lora_A [E * r, in] and lora_B [out, E * r] into `slot`; None clears it."""
        self.clear_slot(slot)
        if a is None:
            return
        experts, r = self.num_experts, a.shape[0] // self.num_experts
        a_e = a.reshape(experts, r, self.in_features).transpose(1, 2)  # [E, in, r]
        b_e = b.reshape(self.out_features, r, experts).permute(2, 1, 0) * scaling  # [E, r, out]
        self.factors[slot] = (a_e.to(self.device, self.dtype).contiguous(), b_e.to(self.device, self.dtype).contiguous())

    def clear_slot(self, slot: int) -> None:
        """Free `slot`'s factors (nothing of the last adapter stays)."""
        self.factors.pop(slot, None)

    def holds(self, slot: int) -> bool:
        """Whether `slot` stores anything of an adapter."""
        return slot in self.factors

    def rank(self, slot: int) -> int:
        factors = self.factors.get(slot)
        return 0 if factors is None else factors[0].shape[-1]

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, expert: int, groups: dict[int, torch.Tensor]) -> None:
        """y [n, out] += each group's rows of x [n, in] through its slot's factors for `expert`;
        `groups` maps a slot to the positions (in x) of its rows."""
        for slot, rows in groups.items():
            factors = self.factors.get(slot)
            if factors is None:
                continue
            a, b = factors
            xs = x.index_select(0, rows).to(self.dtype)  # [m, in]
            delta = (xs @ a[expert]) @ b[expert]  # [m, r] -> [m, out]
            y.index_add_(0, rows, delta.to(y.dtype))


class ExpertsLora:
    """What one experts module needs to add its batch's LoRA terms: the batch context, the slots
    of each fused parameter and the implementation to fall back on when no row uses them."""

    def __init__(self, context: LoraBatchContext, num_experts: int, slots: dict[str, ExpertLoraSlots],
                 base_forward: Callable) -> None:
        self.context = context
        self.num_experts = num_experts
        self.slots = slots
        self.base_forward = base_forward

    def targeting_slots(self) -> set[int]:
        """Slots of the current batch whose adapter targets these experts."""
        ctx = self.context
        if not ctx.any_active:
            return set()
        return {s for s in set(ctx.slots) if s and any(s in p.factors for p in self.slots.values())}


def lora_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts forward with per-sequence LoRA (see the module docstring).

    hidden_states [T, H] (T = B * N, sequence-major, as the MoE block flattens [B, N, H]),
    top_k_index [T, K], top_k_weights [T, K] -> [T, H]
    """
    lora: ExpertsLora = self._loraserve_lora
    targeting = lora.targeting_slots()
    if not targeting:
        return lora.base_forward(self, hidden_states, top_k_index, top_k_weights)
    ctx = lora.context
    tokens_total = hidden_states.shape[0]
    if tokens_total % ctx.batch_size:
        raise RuntimeError(f"experts got {tokens_total} rows for a batch of {ctx.batch_size} sequences")
    per_sequence = tokens_total // ctx.batch_size
    num_experts = lora.num_experts
    # Routing on the host, once per layer (T x K small ints): the groups below are plain lists.
    by_expert: dict[int, tuple[list[int], list[int]]] = {}
    for token, row in enumerate(top_k_index.tolist()):
        for k, expert in enumerate(row):
            if 0 <= expert < num_experts:
                tokens, positions = by_expert.setdefault(expert, ([], []))
                tokens.append(token)
                positions.append(k)
    device = hidden_states.device
    gate_up, down = lora.slots.get("gate_up_proj"), lora.slots.get("down_proj")
    final = torch.zeros_like(hidden_states)  # [T, H]
    for expert in sorted(by_expert):
        tokens, positions = by_expert[expert]
        groups: dict[int, list[int]] = {}
        for local, token in enumerate(tokens):
            slot = ctx.slots[token // per_sequence]
            if slot in targeting:
                groups.setdefault(slot, []).append(local)
        rows = {slot: torch.tensor(local, dtype=torch.long, device=device) for slot, local in groups.items()}
        token_idx = torch.tensor(tokens, dtype=torch.long, device=device)  # [n]
        current = hidden_states[token_idx]  # [n, H]
        projected = expert_linear(self, "gate_up_proj", expert, current)  # [n, 2I]
        if gate_up is not None:
            gate_up.add_delta(projected, current, expert, rows)
        hidden = self._apply_gate(projected)  # [n, I]
        out = expert_linear(self, "down_proj", expert, hidden)  # [n, H]
        if down is not None:
            down.add_delta(out, hidden, expert, rows)
        out = out * top_k_weights[token_idx, torch.tensor(positions, dtype=torch.long, device=device), None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


ExpertsInterface.register(IMPLEMENTATION, lora_experts_forward)


def wrap_experts(model: nn.Module, num_slots: int, context: LoraBatchContext, dtype: torch.dtype,
                 target_modules: tuple[str, ...] | None = None) -> dict[str, ExpertLoraSlots]:
    """Give every routed-experts module of a DeepSeek-V2/V3 model LoRA slots for gate_up_proj and
    down_proj (or those `target_modules` names) and switch the model to this forward; returns
    the slots by `<experts module>.<parameter>` name (empty for a dense model)."""
    modules = routed_experts_modules(model) + [(n, m) for n, m in model.named_modules() if hasattr(m, "_fourbit_meta")]
    names = [n for n in EXPERT_WEIGHTS if target_modules is None or n in target_modules]
    if not modules or not names:
        return {}
    previous = model.config._experts_implementation
    wrapped: dict[str, ExpertLoraSlots] = {}
    for name, module in modules:
        num_experts = _num_experts(module)
        device = next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device
        original = type(module).forward.__wrapped__  # the class's eager forward, under the dispatcher
        slots = {}
        for param in names:
            out_features, in_features = _param_dims(module, param)
            slots[param] = wrapped[f"{name}.{param}"] = ExpertLoraSlots(num_experts, in_features, out_features,
                                                                         device, dtype)
        module._loraserve_lora = ExpertsLora(context, num_experts, slots,
                                             ALL_EXPERTS_FUNCTIONS.get_interface(previous, original))
    model.set_experts_implementation(IMPLEMENTATION)
    return wrapped


def _num_experts(module: nn.Module) -> int:
    meta = getattr(module, "_fourbit_meta", None)
    return meta["num_experts"] if meta is not None else module.gate_up_proj.shape[0]


def _param_dims(module: nn.Module, param: str) -> tuple[int, int]:
    """(out, in) of one expert's `param` matrix."""
    meta = getattr(module, "_fourbit_meta", None)
    if meta is not None:
        return tuple(meta["shapes"][param])
    return tuple(getattr(module, param).shape[1:])
