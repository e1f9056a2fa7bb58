"""Which adapter slot every sequence of a forward uses, and the index tensors the batched
LoRA layers (`layers.py`) take from it: set by the runner before each forward, read by every
layer, computed at most once per forward."""

from __future__ import annotations

import numpy as np
import torch

BAG_ROWS_PER_SLOT = 4
"""Below this many rows per slot in use, several adapters take the per-row embedding_bag path;
at or above it, grouped GEMMs (measured on 2 vCPUs: equal at 4 rows per slot, per-row 1.3-1.8x
faster at 1-2, grouped 1.5-2x faster from 16)."""

KERNEL_ROWS_PER_SLOT = 16
"""On CPU in float32, a decode step of several adapters with fewer than this many rows per slot
in use takes the row kernel (`row_kernel`); at or above it, grouped GEMMs."""


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
        """Whether several adapters take the CPU row kernel at `tokens` rows per sequence (decode)."""
        return self.single_slot is None and tokens == 1 and len(self._active) < KERNEL_ROWS_PER_SLOT * self._used[0]

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
        sequence indices, None when all are active) and, with several adapters, `seq_slots` (each
        active sequence's slot index from 0)."""
        cached = self._per_device.get((device, tokens))
        if cached is None:
            all_active = len(self._active) == self.batch_size
            rows = None if all_active else torch.tensor(self._active, dtype=torch.long, device=device)
            seq_slots = None
            if self.single_slot is None:
                seq_slots = torch.tensor([self._slots[i] - 1 for i in self._active], dtype=torch.long, device=device)
            cached = {"rows": rows, "seq_slots": seq_slots}
            self._per_device[(device, tokens)] = cached
        return cached

    def grouped_index(self, device: torch.device, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the grouped path: `order` (row permutation sorting the active rows by slot) and
        `offs` (int32 segment ends per slot lo..hi, as grouped_mm takes them)."""
        key = (device, tokens, "grouped")
        cached = self._per_device.get(key)
        if cached is None:
            order_list, bounds = self.segments(tokens)
            cached = (torch.tensor(order_list, dtype=torch.long, device=device),
                      torch.tensor(bounds[1:], dtype=torch.int32, device=device))
            self._per_device[key] = cached
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


