"""Linear layers that add many LoRA adapters' terms to one batch in a single pass.

Semantics of `MultiLoraLinear.forward` for a batch of B sequences, slot index s[i] per sequence
(slot 0 = no adapter), for every row (token) x of sequence i:

    y = base(x) + ((x @ A[s[i]]) @ B[s[i]]) * scaling[s[i]]      (only where s[i] != 0)

A is [S, in, R] and B is [S, R, out], R = max_lora_rank: an adapter of rank r < R fills the
first r columns/rows and leaves zeros, so one batched matmul serves every rank. Rows with slot 0
are never touched, so base-only sequences get exactly the base output whatever their batch
mates use. This is our own code, not PEFT's: PEFT's mixed-batch path loops over adapters and
masks rows, which measured 0.46x of a single-adapter batch; gathering per-row A/B and using
`bmm` keeps the cost independent of how many adapters the batch mixes.
"""

from __future__ import annotations

import torch
from torch import nn


class LoraBatchContext:
    """Which slot every sequence of the current forward uses; set by the runner before each
    forward pass and read by every `MultiLoraLinear`. One per model."""

    def __init__(self) -> None:
        self.batch_size = 0
        self._slots: torch.Tensor | None = None  # [B] on CPU
        self._active_rows: torch.Tensor | None = None  # rows with slot != 0
        self._all_active = False
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def set(self, slots: list[int]) -> None:
        """Bind the slot of each sequence (batch order) for the next forward."""
        self.batch_size = len(slots)
        active = [i for i, s in enumerate(slots) if s != 0]
        self._per_device = {}
        if not active:
            self._slots = None
            return
        self._slots = torch.tensor(slots, dtype=torch.long)
        self._all_active = len(active) == len(slots)
        self._active_rows = None if self._all_active else torch.tensor(active, dtype=torch.long)

    @property
    def any_active(self) -> bool:
        return self._slots is not None

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slot per active row, active row indices or None when all rows are active), on `device`;
        copied once per forward per device (layers may sit on several GPUs)."""
        cached = self._per_device.get(device)
        if cached is None:
            if self._all_active:
                cached = (self._slots.to(device), None)
            else:
                rows = self._active_rows
                cached = (self._slots[rows].to(device), rows.to(device))
            self._per_device[device] = cached
        return cached


class MultiLoraLinear(nn.Module):
    """Wraps one linear of the base (nn.Linear, bitsandbytes Linear4bit or Linear8bitLt) and
    holds `num_slots` adapter slots for it."""

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int,
                 context: LoraBatchContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.context = context
        device = _device_of(base_layer)
        # Slot 0 stays all zeros: "no adapter".
        self.register_buffer("lora_a", torch.zeros(num_slots, self.in_features, max_rank, dtype=dtype, device=device),
                             persistent=False)  # [S, in, R]
        self.register_buffer("lora_b", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device),
                             persistent=False)  # [S, R, out]
        self.register_buffer("scaling", torch.zeros(num_slots, dtype=dtype, device=device), persistent=False)  # [S]

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's A ([r, in], PEFT layout) and B ([out, r]) into `slot`; None clears it
        (the adapter does not target this module)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is None:
            self.scaling[slot] = 0.0
            return
        r = a.shape[0]
        self.lora_a[slot, :, :r].copy_(a.t())
        self.lora_b[slot, :r, :].copy_(b.t())
        self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        ctx = self.context
        if not ctx.any_active:
            return y
        batch = ctx.batch_size
        if x.shape[0] != batch:
            raise RuntimeError(
                f"LoRA layer got {x.shape[0]} rows but the batch has {batch} sequences; "
                "this module flattens its input and cannot take per-sequence adapters")
        slots, rows = ctx.on(x.device)
        xs = x.reshape(batch, -1, self.in_features)  # [B, N, in]; any input rank (kv_b_proj gets 4-D)
        if rows is not None:
            xs = xs.index_select(0, rows)  # [b, N, in], only rows that use an adapter
        xs = xs.to(self.lora_a.dtype)
        h = torch.bmm(xs, self.lora_a.index_select(0, slots))  # [b, N, R]
        delta = torch.bmm(h, self.lora_b.index_select(0, slots))  # [b, N, out]
        delta = delta * self.scaling.index_select(0, slots)[:, None, None]
        delta = delta.to(y.dtype)
        out = y.reshape(batch, -1, self.out_features)  # [B, N, out], a view of y
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
        return y


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


# Linear classes whose weight we can wrap. bitsandbytes is optional at import time.
def wrappable_linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:  # a host without bitsandbytes can still serve an unquantized base
        pass
    return tuple(types)
