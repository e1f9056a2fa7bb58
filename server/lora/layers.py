"""Linear layers that add many LoRA adapters' terms to one batch in a single pass.

Semantics of `MultiLoraLinear.forward` for a batch of B sequences, slot index s[i] per sequence
(slot 0 = no adapter), for every row (token) x of sequence i:

    y = base(x) + (x @ A[s[i]]) @ (B[s[i]] * scaling[s[i]])      (only where s[i] != 0)

A is stored as [S, in, R] and B as [S, R, out] for the S = max_loras real slots (slot 0 has
no storage: its rows are never touched, so base-only sequences get exactly the base output
whatever their batch mates use), R = max_lora_rank: an adapter of rank r < R fills the first r
columns/rows and leaves zeros, and the scaling is folded into B when a slot is loaded. A freed
slot is zeroed. Each layer knows the rank of each slot's adapter there (0: not targeted), and a
row pays for its own rank: the single-adapter and per-row paths read r columns of A (the per-row
path in 64-byte chunks) and r rows of B, the grouped path the highest rank among its slots; a
module no adapter of the batch targets costs nothing but the base.

Isolation: a row only ever meets its own slot's A and B. Rows are grouped by slot and each group
is multiplied by that slot's matrices alone (no row is multiplied by another slot's values and
then masked away: NaN x 0 and 0 x inf are NaN, so a mask would let one adapter's bad values
reach every row of the batch).

Five paths, none loops over requests in Python:
- one adapter among the active rows (every single-adapter batch): two plain matmuls with that
  slot's (contiguous) A and B, the second added into the base output in place;
- on CPU in float32, a decode step of several adapters (under `KERNEL_ROWS_PER_SLOT` rows per
  slot in use): the row kernel (`row_kernel.py`), one compiled loop over the rows sorted by
  slot, each row multiplied by its own slot's A and B at its own rank and added into the base
  output in place. Measured on the small deepseek-llm base in NF4, 32 rows of 32 adapters: its
  decode step 46.5 -> 39.1 ms (base alone 28.5 ms), 8 adapters x 4 rows 42.7 -> 38.9 ms;
- on CPU, several adapters with several tokens per sequence (prefill, and MLA's kv_b_proj, which
  expands a sequence's whole cached latent every unabsorbed step): one batched matmul pair over
  each sequence's own copy of its slot's A and B. 2-9x faster than the grouped path on CPU
  (whose kernel runs one matmul per group): kv_b_proj of the small V3 over 32 sequences x 50
  tokens of 32 adapters 4.5 ms -> 0.5 ms per call;
- elsewhere (CUDA, other dtypes), several adapters, few rows each (under `BAG_ROWS_PER_SLOT`
  rows per slot in use): every row is its own "bag" of `F.embedding_bag` (mode sum, the row's
  values as per-sample weights) over its slot's rows of A, then of B. One kernel reads each
  row's own slot and nothing else, with no gather copy and no per-slot launch; measured here
  (1 thread) 1.6-2x faster than grouped_mm for 32 rows of 32 adapters;
- several adapters, many rows each (prefill, or decode with few adapters): the active rows are
  sorted by slot into contiguous segments and two grouped GEMMs (`torch.nn.functional.grouped_mm`)
  compute every segment with its own slot's A and B, after which the rows go back to their
  places. The groups are the slots from the lowest to the highest in use only (grouped_mm's CPU
  kernel costs ~2 us per group, empty or not). Where grouped_mm has no kernel for the device and
  dtype (CUDA supports only bf16 on SM80+), the segments run as one pair of matmuls per slot in use.

This is our own code, not PEFT's: PEFT's mixed-batch path loops over adapters and masks rows,
which measured 0.46x of a single-adapter batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.lora import row_kernel
from loraserve.lora.batch_context import LoraBatchContext

_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped_mm runs on this device and dtype (probed once on tiny tensors)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        try:
            a = torch.ones(3, 8, device=device, dtype=dtype)
            b = torch.ones(2, 8, 8, device=device, dtype=dtype)
            out = F.grouped_mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32, device=device))
            _GROUPED_MM_WORKS[key] = bool(out.shape == (3, 8) and float(out[0, 0]) == 8.0)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


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
        self.register_buffer("lora_a", torch.zeros(self.stored, self.in_features, max_rank, dtype=dtype, device=device),
                             persistent=False)  # [S, in, R]
        self.register_buffer("lora_b", torch.zeros(self.stored, max_rank, self.out_features, dtype=dtype, device=device),
                             persistent=False)  # [S, R, out], scaling folded in
        self.ranks = [0] * num_slots
        """Rank of the adapter in each slot for this layer (by slot number; 0: none, or the
        adapter does not target this module): the columns of A and rows of B a row pays for."""
        self._stored_ranks = np.zeros(self.stored, dtype=np.int64)  # ranks[1:], as the row kernel reads them
        self._single: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_slots
        """Per slot number, views of its A [in, r] and B [r, out] for the one-adapter path."""
        self._row_kernel = row_kernel.usable(torch.empty(0, device=device), self.lora_a)
        # A's columns are read in chunks of one cache line (64 bytes) by the per-row path.
        line = 64 // dtype.itemsize
        self._chunk = line if max_rank % line == 0 else max_rank
        self._per_sequence_ok = device.type == "cpu"
        # CUDA's grouped GEMM wants 16-byte aligned rows; real model dims are, a rank may not be.
        aligned = device.type == "cpu" or all(d % 8 == 0 for d in (self.in_features, max_rank, self.out_features))
        self._grouped = aligned and grouped_mm_works(device, dtype)

    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one adapter's A ([r, in], PEFT layout) and B ([out, r]) into `slot`; None clears it
        (the adapter does not target this module). Slots are numbered from 1."""
        self.clear_slot(slot)
        if a is None:
            return
        r = a.shape[0]
        self.lora_a[slot - 1, :, :r].copy_(a.t())
        self.lora_b[slot - 1, :r, :].copy_(b.t() * scaling)
        self.ranks[slot] = r
        self._stored_ranks[slot - 1] = r
        self._single[slot] = (self.lora_a[slot - 1, :, :r], self.lora_b[slot - 1, :r])

    def clear_slot(self, slot: int) -> None:
        """Zero `slot` (numbered from 1): a freed slot holds nothing of its last adapter."""
        self.lora_a[slot - 1].zero_()
        self.lora_b[slot - 1].zero_()
        self.ranks[slot] = 0
        self._stored_ranks[slot - 1] = 0
        self._single[slot] = None

    def holds(self, slot: int) -> bool:
        """Whether `slot` stores anything of an adapter (any non-zero value)."""
        return bool(self.lora_a[slot - 1].any() or self.lora_b[slot - 1].any())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        ctx = self.context
        if not ctx.any_active:
            return y
        if ctx.all_active and ctx.single_slot is not None and x.dtype == self.lora_a.dtype == y.dtype \
                and y.is_contiguous():
            # Every row on one adapter (how rows are laid out does not matter then): y += (x A) B.
            views = self._single[ctx.single_slot]
            if views is not None:
                y.view(-1, self.out_features).addmm_(x.reshape(-1, self.in_features) @ views[0], views[1])
            return y
        batch = ctx.batch_size
        if x.shape[0] != batch:
            raise RuntimeError(
                f"LoRA layer got {x.shape[0]} rows but the batch has {batch} sequences; "
                "this module flattens its input and cannot take per-sequence adapters")
        xs = x.reshape(batch, -1, self.in_features)  # [B, N, in]; any input rank (kv_b_proj gets 4-D)
        n = xs.shape[1]
        if self._row_kernel and ctx.kernel_rows(n) and x.dtype == torch.float32 and y.is_contiguous() \
                and not y.requires_grad:  # serving only: it writes y in place, outside autograd
            slot, order = ctx.row_plan(n)
            row_kernel.add_rows(xs.reshape(batch * n, self.in_features).contiguous(), self.lora_a, self.lora_b,
                                slot, order, self._stored_ranks, y.view(batch * n, self.out_features))
            return y
        index = ctx.tensors(x.device, n)
        rows = index["rows"]
        if rows is not None:
            xs = xs.index_select(0, rows)  # [b, N, in], only rows that use an adapter
        if xs.dtype != self.lora_a.dtype:
            xs = xs.to(self.lora_a.dtype)
        b = xs.shape[0]
        flat = xs.reshape(b * n, self.in_features)  # [M, in], M = b*N: one GEMM, not b GEMMs of N rows
        lo, hi = ctx.slot_range
        r = max(self.ranks[lo:hi + 1])  # the highest rank among the batch's adapters in this module
        if r == 0:
            return y  # none of them targets this module
        if ctx.single_slot is not None:
            a, b_r = self._single[ctx.single_slot]  # [in, r], [r, out]
            h = flat @ a  # [M, r]
            if rows is None and h.dtype == y.dtype and y.is_contiguous():
                y.view(b * n, self.out_features).addmm_(h, b_r)  # y += h @ B, in place
                return y
            delta = h @ b_r  # [M, out]
        elif self._per_sequence_ok and n > 1:
            delta = self._per_sequence(xs, index["seq_slots"], r)
        elif ctx.per_row(n):
            delta = self._per_row(flat, ctx.row_bags(x.device, n, self.in_features, self.max_rank, self._chunk,
                                                     tuple(self.ranks)))
        else:
            r = min(self.max_rank, -(-r // 8) * 8)  # CUDA's grouped GEMM wants 16-byte rows
            order, offs = ctx.grouped_index(x.device, n)
            delta = self._segmented(flat, order, offs, ctx.segments(n)[1], ctx.slot_range, r)
        delta = delta.view(b, n, self.out_features)
        if delta.dtype != y.dtype:
            delta = delta.to(y.dtype)
        out = y.view(batch, -1, self.out_features)  # [B, N, out], a view of y
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
        return y

    def _per_sequence(self, xs: torch.Tensor, seq_slots: torch.Tensor, rank: int) -> torch.Tensor:
        """Each sequence's rows with its own slot's A and B, up to the highest `rank` among them
        (the columns past a slot's own rank are zeros): one batched matmul pair over copies of
        each sequence's A and B. [b, N, in] -> [b, N, out]."""
        a = self.lora_a[:, :, :rank].index_select(0, seq_slots)  # [b, in, r]
        b = self.lora_b[:, :rank].index_select(0, seq_slots)  # [b, r, out]
        return torch.bmm(torch.bmm(xs, a), b)

    def _per_row(self, flat: torch.Tensor, bags: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row with its own slot's A and B at its own rank, one bag per row (and per chunk
        of A's columns): [M, in] -> [M, out]."""
        m, chunk = flat.shape[0], self._chunk
        rows = bags["a_rows"]
        # hc[q] = sum_k flat[row q, k] * A[s, k, chunk q's columns]
        hc = F.embedding_bag(bags["a_index"], self.lora_a.view(-1, chunk), mode="sum",
                             per_sample_weights=flat if rows is None else flat.index_select(0, rows))  # [Q, chunk]
        if bags["a_dest"] is None:
            h = hc  # [M, R]
        else:
            h = flat.new_zeros(m * (self.max_rank // chunk), chunk)
            h.index_copy_(0, bags["a_dest"], hc)  # [M * R / chunk, chunk] = [M, R], zeros past each rank
        pos = bags["b_pos"]
        weights = h.reshape(m, self.max_rank) if pos is None else h.view(-1).index_select(0, pos)
        return F.embedding_bag(bags["b_index"], self.lora_b.view(-1, self.out_features), bags["b_offsets"],
                               mode="sum", per_sample_weights=weights)  # [M, out]

    def _segmented(self, flat: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                   bounds: list[int], slot_range: tuple[int, int], rank: int) -> torch.Tensor:
        """Rows of several adapters, each multiplied by its own slot only, up to the highest
        `rank` among them (the columns past a slot's own rank are zeros): [M, in] -> [M, out]."""
        lo, hi = slot_range
        grouped = flat.index_select(0, order)  # [M, in], rows sorted by slot
        if self._grouped:
            h = F.grouped_mm(grouped, self.lora_a[lo - 1:hi, :, :rank], offs=offs)  # [M, rank]
            sorted_delta = F.grouped_mm(h, self.lora_b[lo - 1:hi, :rank], offs=offs)  # [M, out]
        else:
            sorted_delta = grouped.new_empty(grouped.shape[0], self.out_features)
            for k, s in enumerate(range(lo - 1, hi)):
                first, last = bounds[k], bounds[k + 1]
                r = self.ranks[s + 1]
                if last > first and r:
                    torch.mm(grouped[first:last] @ self.lora_a[s, :, :r], self.lora_b[s, :r],
                             out=sorted_delta[first:last])
                elif last > first:
                    sorted_delta[first:last] = 0
        delta = torch.empty_like(sorted_delta)
        delta.index_copy_(0, order, sorted_delta)  # back to row order
        return delta


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
