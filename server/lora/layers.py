"""Linear layers that add many LoRA adapters' terms to one batch in a single pass.

Semantics of `MultiLoraLinear.forward` for a batch of B sequences, slot index s[i] per sequence
(slot 0 = no adapter), for every row (token) x of sequence i:

    y = base(x) + (x @ A[s[i]]) @ (B[s[i]] * scaling[s[i]])      (only where s[i] != 0)

A is stored as [in, S, R] and B as [S, R, out] for the S = max_loras real slots (slot 0 has
no storage: its rows are skipped, and the dense path below reads every stored slot, so an
all-zero slot would only cost bandwidth), R = max_lora_rank: an adapter of rank r < R
fills the first r columns/rows and leaves zeros, so one matmul serves every rank, and the
scaling is folded into B when a slot is loaded. Rows with slot 0 are never touched, so
base-only sequences get exactly the base output whatever their batch mates use.

Two paths, both without a Python loop over requests or adapters:
- one adapter among the active rows (every prefill, single-adapter batches): two plain matmuls
  with that slot's A and B;
- several adapters, one token per sequence (a decode step): `h = x @ A.view(in, S*R)` computes
  every slot's projection in one GEMM, a one-hot mask keeps each row's own slot block, and
  `h @ B.view(S*R, out)` finishes in a second GEMM. Nothing is gathered per row: gathering A/B
  per row ([B, in, R] copies per layer, per step) measured ~25% of a CPU decode step. The extra
  work is S*R columns for one token, small next to the base layer; `MAX_DENSE_COLUMNS` bounds it;
- several adapters, many tokens per sequence (a prefill, or MLA's kv_b_proj, which transformers
  applies to the whole latent cache every step): each sequence's A and B are gathered once
  and two `bmm`s run; the gather is paid once for all of the sequence's tokens, while the
  one-hot path would multiply its S-fold extra work by every token.

This is our own code, not PEFT's: PEFT's mixed-batch path loops over adapters and masks rows,
which measured 0.46x of a single-adapter batch.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_DENSE_COLUMNS = 2048
"""Above S*R columns, computing every slot's projection costs more than gathering per row."""


class LoraBatchContext:
    """Which slot every sequence of the current forward uses; set by the runner before each
    forward pass and read by every `MultiLoraLinear`. One per model."""

    def __init__(self, num_slots: int = 0) -> None:
        self.num_slots = num_slots
        """Slots per layer (max_loras + 1); `wrap_model` sets it."""
        self.batch_size = 0
        self.single_slot: int | None = None
        """The one slot all active rows share, or None when they use several."""
        self._slots: list[int] = []
        self._active: list[int] = []
        self._per_device: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor | None]] = {}

    def set(self, slots: list[int]) -> None:
        """Bind the slot of each sequence (batch order) for the next forward."""
        self.batch_size = len(slots)
        self._slots = slots
        self._active = [i for i, s in enumerate(slots) if s != 0]
        distinct = {slots[i] for i in self._active}
        self.single_slot = next(iter(distinct)) if len(distinct) == 1 else None
        self._per_device = {}

    @property
    def any_active(self) -> bool:
        return bool(self._active)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        """Per-forward index tensors on `device`, built once per device (layers may sit on
        several GPUs): `rows` (active row indices, None when all rows are active), `slots`
        (slot per active row) and `onehot` ([b, S] in `dtype`, 1 at each active row's slot)."""
        cached = self._per_device.get((device, dtype))
        if cached is None:
            all_active = len(self._active) == self.batch_size
            rows = None if all_active else torch.tensor(self._active, dtype=torch.long, device=device)
            # Storage index of each active row's slot (slot 0 has no storage, so slot s is s - 1).
            slots = torch.tensor([self._slots[i] - 1 for i in self._active], dtype=torch.long, device=device)
            onehot = None
            if self.single_slot is None:
                onehot = torch.zeros(len(self._active), self.num_slots - 1, device=device, dtype=dtype)
                onehot[torch.arange(len(self._active), device=device), slots] = 1.0
            cached = {"rows": rows, "slots": slots, "onehot": onehot}
            self._per_device[(device, dtype)] = cached
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
        self.stored = num_slots - 1  # slots 1..num_slots-1 have storage; slot 0 is "no adapter"
        self.max_rank = max_rank
        self.context = context
        device = _device_of(base_layer)
        self.register_buffer("lora_a", torch.zeros(self.in_features, self.stored, max_rank, dtype=dtype, device=device),
                             persistent=False)  # [in, S, R]
        self.register_buffer("lora_b", torch.zeros(self.stored, max_rank, self.out_features, dtype=dtype, device=device),
                             persistent=False)  # [S, R, out], scaling folded in

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's A ([r, in], PEFT layout) and B ([out, r]) into `slot`; None clears it
        (the adapter does not target this module). Slots are numbered from 1."""
        index = slot - 1
        self.lora_a[:, index].zero_()
        self.lora_b[index].zero_()
        if a is None:
            return
        r = a.shape[0]
        self.lora_a[:, index, :r].copy_(a.t())
        self.lora_b[index, :r, :].copy_(b.t() * scaling)

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
        index = ctx.tensors(x.device, self.lora_a.dtype)
        rows = index["rows"]
        xs = x.reshape(batch, -1, self.in_features)  # [B, N, in]; any input rank (kv_b_proj gets 4-D)
        if rows is not None:
            xs = xs.index_select(0, rows)  # [b, N, in], only rows that use an adapter
        if xs.dtype != self.lora_a.dtype:
            xs = xs.to(self.lora_a.dtype)
        b, n = xs.shape[0], xs.shape[1]
        flat = xs.reshape(b * n, self.in_features)  # 2-D: one GEMM, not b GEMMs of n rows
        if ctx.single_slot is not None:
            index_of_slot = ctx.single_slot - 1
            delta = (flat @ self.lora_a[:, index_of_slot]) @ self.lora_b[index_of_slot]  # [b*N, R] -> [b*N, out]
        elif n == 1 and self.stored * self.max_rank <= MAX_DENSE_COLUMNS:
            h = flat @ self.lora_a.view(self.in_features, -1)  # [b*N, S*R]: every slot at once
            h = h.view(b, n, self.stored, self.max_rank) * index["onehot"][:, None, :, None]
            delta = h.view(b * n, -1) @ self.lora_b.view(-1, self.out_features)  # [b*N, out]
        else:
            slots = index["slots"]
            a = self.lora_a.index_select(1, slots).permute(1, 0, 2)  # [b, in, R]
            delta = torch.bmm(torch.bmm(xs, a), self.lora_b.index_select(0, slots))  # [b, N, out]
        delta = delta.view(b, n, self.out_features)
        if delta.dtype != y.dtype:
            delta = delta.to(y.dtype)
        out = y.view(batch, -1, self.out_features)  # [B, N, out], a view of y
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
