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

Four paths, none loops over requests in Python:
- one adapter among the active rows (every single-adapter batch): two plain matmuls with that
  slot's (contiguous) A and B, the second added into the base output in place;
- on CPU in float32, several adapters with few rows each (every decode step of many adapters,
  and prefill under `KERNEL_ROWS_PER_SLOT` rows per slot in use): the row kernel
  (`row_kernel.py`), one compiled loop over the rows sorted by slot, each row multiplied by its
  own slot's A and B at its own rank and added into the base output in place. Measured on the
  small deepseek-llm base in NF4, 32 rows of 32 adapters: its decode step 46.5 -> 39.1 ms
  (base alone 28.5 ms), 8 adapters x 4 rows 42.7 -> 38.9 ms;
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

BAG_ROWS_PER_SLOT = 4
"""Below this many rows per slot in use, several adapters take the per-row embedding_bag path;
at or above it, grouped GEMMs (measured on 2 vCPUs: equal at 4 rows per slot, per-row 1.3-1.8x
faster at 1-2, grouped 1.5-2x faster from 16)."""

KERNEL_ROWS_PER_SLOT = 16
"""On CPU in float32, below this many rows per slot in use several adapters take the row kernel
(`row_kernel`) instead; at or above it, grouped GEMMs."""


class LoraBatchContext:
    """Which slot every sequence of the current forward uses; set by the runner before each
    forward pass and read by every `MultiLoraLinear`. One per model."""

    def __init__(self, num_slots: int = 0) -> None:
        self.num_slots = num_slots
        """Slots per layer (max_loras + 1); `wrap_model` sets it."""
        self.batch_size = 0
        self.single_slot: int | None = None
        """The one slot all active rows share, or None when they use several."""
        self.any_active = False
        """Whether any row uses an adapter (a plain attribute: every layer reads it every forward)."""
        self.all_active = False
        """Whether every row does."""
        self._slots: list[int] = []
        self._active: list[int] = []
        self._used: tuple[int, int, int] = (0, 0, 0)  # (distinct slots in use, lowest, highest)
        self._segments: dict[int, tuple[list[int], list[int]]] = {}  # tokens per row -> (order, bounds)
        self._per_device: dict[tuple, dict[str, torch.Tensor | None]] = {}
        self._row_plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def set(self, slots: list[int]) -> None:
        """Bind the slot of each sequence (batch order) for the next forward."""
        self.batch_size = len(slots)
        self._slots = slots
        self._active = [i for i, s in enumerate(slots) if s != 0]
        self.any_active = bool(self._active)
        self.all_active = len(self._active) == len(slots)
        distinct = {slots[i] for i in self._active}
        self.single_slot = next(iter(distinct)) if len(distinct) == 1 else None
        self._used = (len(distinct), min(distinct), max(distinct)) if distinct else (0, 0, 0)
        self._segments = {}
        self._per_device = {}
        self._row_plans = {}

    @property
    def slots(self) -> list[int]:
        """The slot of each sequence of the current forward (batch order)."""
        return self._slots

    @property
    def slot_range(self) -> tuple[int, int]:
        """The lowest and highest slot in use (numbered from 1)."""
        return self._used[1], self._used[2]

    def per_row(self, tokens: int) -> bool:
        """Whether several adapters take the per-row path at `tokens` rows per sequence."""
        return self.single_slot is None and len(self._active) * tokens < BAG_ROWS_PER_SLOT * self._used[0]

    def kernel_rows(self, tokens: int) -> bool:
        """Whether several adapters take the CPU row kernel at `tokens` rows per sequence."""
        return self.single_slot is None and len(self._active) * tokens < KERNEL_ROWS_PER_SLOT * self._used[0]

    def row_plan(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """For the row kernel, over all B * tokens rows: (`slot` [M], each row's slot index from
        0, -1 for none; `order`: the rows with a slot, sorted by it). Computed once per forward."""
        cached = self._row_plans.get(tokens)
        if cached is None:
            slot = np.repeat(np.asarray(self._slots, dtype=np.int64) - 1, tokens)
            order = np.argsort(slot, kind="stable")
            cached = (slot, order[np.count_nonzero(slot < 0):])
            self._row_plans[tokens] = cached
        return cached

    def segments(self, tokens: int) -> tuple[list[int], list[int]]:
        """For `tokens` rows per sequence, over the active sequences' rows (in active order):
        (`order`: row indices sorted by slot, stable; `bounds`: segment boundaries for the slots
        lo..hi in use, slot lo + k's rows being order[bounds[k]:bounds[k + 1]]). Plain lists,
        computed once per forward."""
        cached = self._segments.get(tokens)
        if cached is None:
            lo, hi = self.slot_range
            by_slot: list[list[int]] = [[] for _ in range(hi - lo + 1)]
            for position, i in enumerate(self._active):
                by_slot[self._slots[i] - lo].extend(range(position * tokens, (position + 1) * tokens))
            order = [row for rows in by_slot for row in rows]
            bounds = [0]
            for rows in by_slot:
                bounds.append(bounds[-1] + len(rows))
            cached = (order, bounds)
            self._segments[tokens] = cached
        return cached

    def tensors(self, device: torch.device, tokens: int) -> dict[str, torch.Tensor | None]:
        """Per-forward index tensors on `device` (layers may sit on several GPUs): `rows` (active
        sequence indices, None when all are active) and, for the grouped path, `order` (row
        permutation sorting the active rows by slot) and `offs` (int32 segment ends per slot
        lo..hi, as grouped_mm takes them)."""
        cached = self._per_device.get((device, tokens))
        if cached is None:
            all_active = len(self._active) == self.batch_size
            rows = None if all_active else torch.tensor(self._active, dtype=torch.long, device=device)
            order = offs = None
            if self.single_slot is None and not self.per_row(tokens):
                order_list, bounds = self.segments(tokens)
                order = torch.tensor(order_list, dtype=torch.long, device=device)
                offs = torch.tensor(bounds[1:], dtype=torch.int32, device=device)
            cached = {"rows": rows, "order": order, "offs": offs}
            self._per_device[(device, tokens)] = cached
        return cached

    def row_bags(self, device: torch.device, tokens: int, in_features: int, max_rank: int, chunk: int,
                 ranks: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """For the per-row path of a layer whose slots hold adapters of `ranks` (per slot number,
        0: none there): each row m (of M) is multiplied by its own slot's first r columns of A
        (in chunks of `chunk` columns, one bag each) and first r rows of B, r its slot's rank in
        this layer, so a row pays for its own rank. Cached per forward and rank layout.
          a_index [Q, in]: rows of A viewed as [S * in * (R / chunk), chunk], one bag per chunk
          a_rows [Q]: which row's values weigh the bag; a_dest [Q]: its place in h [M * R / chunk, chunk]
          b_index [T], b_offsets [M]: rows of B viewed as [S * R, out], one bag per row
          b_pos [T]: where each B row's weight sits in h viewed as [M * R]"""
        key = (device, tokens, in_features, max_rank, chunk, ranks)
        cached = self._per_device.get(key)
        if cached is None:
            per_rank = max_rank // chunk
            a_base, a_rows, a_dest, b_index, b_offsets, b_pos = [], [], [], [], [], []
            m = 0
            for i in self._active:
                slot = self._slots[i] - 1
                r = ranks[slot + 1]
                for _ in range(tokens):
                    for c in range(-(-r // chunk)):
                        a_base.append(slot * in_features * per_rank + c)
                        a_rows.append(m)
                        a_dest.append(m * per_rank + c)
                    b_offsets.append(len(b_index))
                    b_index.extend(range(slot * max_rank, slot * max_rank + r))
                    b_pos.extend(range(m * max_rank, m * max_rank + r))
                    m += 1
            long = {"dtype": torch.long, "device": device}
            k = torch.arange(in_features, **long) * per_rank
            cached = {"a_index": torch.tensor(a_base, **long)[:, None] + k, "a_rows": torch.tensor(a_rows, **long),
                      "a_dest": torch.tensor(a_dest, **long), "b_index": torch.tensor(b_index, **long),
                      "b_offsets": torch.tensor(b_offsets, **long), "b_pos": torch.tensor(b_pos, **long)}
            if len(b_index) == m * max_rank:  # every row at full rank: no gathers, B's bags 2-D
                cached["b_index"] = cached["b_index"].view(m, max_rank)
                cached["b_offsets"] = cached["b_pos"] = None
                if per_rank == 1:  # and A in one chunk: row q of the bags is row q of the batch
                    cached["a_rows"] = cached["a_dest"] = None
            self._per_device[key] = cached
        return cached


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
            s = ctx.single_slot - 1
            h = flat @ self.lora_a[s, :, :r]  # [M, r]
            if rows is None and h.dtype == y.dtype and y.is_contiguous():
                y.view(b * n, self.out_features).addmm_(h, self.lora_b[s, :r])  # y += h @ B, in place
                return y
            delta = h @ self.lora_b[s, :r]  # [M, out]
        elif index["order"] is None:
            delta = self._per_row(flat, ctx.row_bags(x.device, n, self.in_features, self.max_rank, self._chunk,
                                                     tuple(self.ranks)))
        else:
            r = min(self.max_rank, -(-r // 8) * 8)  # CUDA's grouped GEMM wants 16-byte rows
            delta = self._segmented(flat, index["order"], index["offs"], ctx.segments(n)[1], ctx.slot_range, r)
        delta = delta.view(b, n, self.out_features)
        if delta.dtype != y.dtype:
            delta = delta.to(y.dtype)
        out = y.view(batch, -1, self.out_features)  # [B, N, out], a view of y
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
        return y

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
