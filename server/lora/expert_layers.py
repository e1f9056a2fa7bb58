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

Isolation as in `layers.py`: the (token, expert) pairs are grouped by slot and each group is
multiplied by its own slot's factors only. When no sequence of the batch uses an adapter that
targets these experts, the forward is the base's own experts implementation, untouched. When
some do, every pair runs through one pass per routed expert (the 4-bit experts' own algorithm;
with unquantized experts transformers' eager one, equal to its grouped_mm kernel to float
rounding), and each slot's LoRA terms take one of two paths, as the linears' do:
- few pairs per expert (decode): every pair is one `F.embedding_bag` bag over its expert's rows
  of A (weighted by its values), then of B: two kernels per slot and parameter, reading only the
  experts its pairs hit;
- many (prefill): one matmul pair per expert hit, over that expert's contiguous pairs.

This is our own code: PEFT's ParamWrapper merges one adapter into the whole weight per forward,
which cannot mix adapters in a batch, and vLLM's fused-MoE LoRA kernels are CUDA/Triton only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from loraserve.base.moe_experts import EXPERT_WEIGHTS, expert_linear, fourbit_experts_modules, routed_experts_modules
from loraserve.lora.batch_context import LoraBatchContext

IMPLEMENTATION = "loraserve_lora"
BAG_ROWS_PER_EXPERT = 4
"""Below this many of a slot's pairs per expert hit, its LoRA terms take the per-pair
embedding_bag path; at or above it, one matmul pair per expert (the linears' measured split)."""


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

    def add_deltas(self, y: torch.Tensor, x: torch.Tensor, groups: dict[int, SlotRows]) -> None:
        """y [P, out] += every (token, expert) pair's row of x [P, in] through its own slot's
        factors for its own expert; `groups` holds each slot's pairs (see `SlotRows`)."""
        for slot, group in groups.items():
            factors = self.factors.get(slot)
            if factors is None:
                continue
            a, b = factors  # [E, in, r], [E, r, out]
            r = a.shape[-1]
            xs = x.index_select(0, group.rows).to(self.dtype)  # [m, in]
            if group.per_row():
                # Each pair is one bag over its expert's rows of A, then of B, weighted by its
                # own values: one kernel reads each pair's own expert and nothing else.
                a_index = (group.experts * self.in_features)[:, None] + torch.arange(self.in_features, device=x.device)
                h = F.embedding_bag(a_index, a.view(-1, r), per_sample_weights=xs, mode="sum")  # [m, r]
                b_index = (group.experts * r)[:, None] + torch.arange(r, device=x.device)
                delta = F.embedding_bag(b_index, b.view(-1, self.out_features), per_sample_weights=h, mode="sum")
            else:
                delta = torch.empty(xs.shape[0], self.out_features, dtype=self.dtype, device=x.device)
                for expert, first, last in group.segments:
                    delta[first:last] = (xs[first:last] @ a[expert]) @ b[expert]  # [n, r] -> [n, out]
            y.index_add_(0, group.rows, delta.to(y.dtype))


class SlotRows:
    """One slot's (token, expert) pairs in a forward: their positions among all pairs (`rows`,
    sorted by expert), each one's expert, and the segments (expert, first, last) of `rows`."""

    def __init__(self, rows: list[int], experts: list[int], device: torch.device) -> None:
        self.segments = _segments(experts)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)  # [m]
        self.experts = torch.tensor(experts, dtype=torch.long, device=device)  # [m]

    def per_row(self) -> bool:
        """Few pairs per expert (a decode step): per-pair bags beat one matmul pair per expert."""
        return self.rows.shape[0] < BAG_ROWS_PER_EXPERT * len(self.segments)


def _segments(experts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first, last) of each run of equal experts in a list sorted by expert."""
    segments: list[tuple[int, int, int]] = []
    for i, expert in enumerate(experts):
        if segments and segments[-1][0] == expert:
            segments[-1] = (expert, segments[-1][1], i + 1)
        else:
            segments.append((expert, i, i + 1))
    return segments


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
    # Routing on the host, once per layer (T x K small ints): every (token, expert) pair, sorted
    # by expert, and each targeting slot's pairs among them.
    routes = top_k_index.tolist()
    pairs = sorted((expert, token, k) for token, row in enumerate(routes) for k, expert in enumerate(row)
                   if 0 <= expert < lora.num_experts)
    if not pairs:
        return torch.zeros_like(hidden_states)
    by_slot: dict[int, tuple[list[int], list[int]]] = {}
    bounds = _segments([expert for expert, _, _ in pairs])  # (expert, first, last) over all pairs
    for i, (expert, token, _) in enumerate(pairs):
        slot = ctx.slots[token // per_sequence]
        if slot in targeting:
            rows, experts = by_slot.setdefault(slot, ([], []))
            rows.append(i)
            experts.append(expert)
    device = hidden_states.device
    groups = {slot: SlotRows(rows, experts, device) for slot, (rows, experts) in by_slot.items()}
    token_idx = torch.tensor([t for _, t, _ in pairs], dtype=torch.long, device=device)  # [P]
    positions = torch.tensor([k for _, _, k in pairs], dtype=torch.long, device=device)  # [P]
    current = hidden_states[token_idx]  # [P, H]
    gate_up, down = lora.slots.get("gate_up_proj"), lora.slots.get("down_proj")
    projected = torch.cat([expert_linear(self, "gate_up_proj", e, current[first:last])
                           for e, first, last in bounds])  # [P, 2I]
    if gate_up is not None:
        gate_up.add_deltas(projected, current, groups)
    hidden = self._apply_gate(projected)  # [P, I]
    out = torch.cat([expert_linear(self, "down_proj", e, hidden[first:last]) for e, first, last in bounds])  # [P, H]
    if down is not None:
        down.add_deltas(out, hidden, groups)
    out = out * top_k_weights[token_idx, positions, None]
    final = torch.zeros_like(hidden_states)  # [T, H]
    final.index_add_(0, token_idx, out.to(final.dtype))  # pairs in expert order, as the base loop adds them
    return final


ExpertsInterface.register(IMPLEMENTATION, lora_experts_forward)


def wrap_experts(model: nn.Module, num_slots: int, context: LoraBatchContext, dtype: torch.dtype,
                 target_modules: tuple[str, ...] | None = None) -> dict[str, ExpertLoraSlots]:
    """Give every routed-experts module of a DeepSeek-V2/V3 model LoRA slots for gate_up_proj and
    down_proj (or those `target_modules` names) and switch the model to this forward; returns
    the slots by `<experts module>.<parameter>` name (empty for a dense model)."""
    modules = routed_experts_modules(model) + fourbit_experts_modules(model)
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
