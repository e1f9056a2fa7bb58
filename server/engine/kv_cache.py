"""The running batch's KV cache: per layer, one buffer pair with spare rows and spare columns on
both sides, the batch's rows aligned on the right.

Every row shares one time axis, columns `start..end` of the buffer; a sequence shorter than the
batch's longest sits at the right end of its row and the columns before it are padding (zeros,
masked out of attention). A decode step writes every row's new token at column `end`. So the
model sees an ordinary transformers `Cache`, and:
- a sequence joins by writing its own rows into spare rows (a longer one than the batch's
  longest first moves `start` left into the spare columns, zeroing them for the other rows);
- a sequence leaves by moving the last row into its place (one row copied), and padding no
  remaining row needs is dropped by moving `start` right (nothing copied);
- only when spare rows or columns run out is the buffer reallocated, with twice the spare;
- an emptied batch keeps its buffers for the next one; the scheduler frees them (`release`)
  once the engine has been idle for a while.
So nothing but the joining or leaving sequence itself is copied, amortized over the batch's
life. The whole layout lives in this class: a paged layout could replace it without touching
the scheduler or the runner.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_SPARE_COLUMNS = 64
MIN_ROWS = 8


class _RowLayer(DynamicLayer):
    """One layer's keys/values: buffers [R, H, C, D]; rows 0..rows-1 and columns start..end hold
    the batch (what `keys` / `values` view)."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.rows = 0
        self.start = 0
        self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._k[:self.rows, :, self.start:self.end]
        self.values = self._v[:self.rows, :, self.start:self.end]

    def reserve(self, rows: int, left: int, right: int, k_like: torch.Tensor, v_like: torch.Tensor) -> None:
        """Make room for `rows` rows, `left` columns before `start` and `right` after `end`:
        reallocated (the batch copied once) only when the spare runs out, with twice as much."""
        if self._k is not None and self.rows == 0 and rows <= self._k.shape[0] and left + right <= self._k.shape[2]:
            # An emptied batch kept its buffers: nothing to move, so it starts wherever it fits
            # (at least the default spare on the left where there is room).
            self.start = self.end = max(left, min(MIN_SPARE_COLUMNS, self._k.shape[2] - right))
            return
        if self._k is not None and rows <= self._k.shape[0] and left <= self.start \
                and self.end + right <= self._k.shape[2]:
            return
        old_rows = self._k.shape[0] if self._k is not None else 0
        new_rows = max(rows, MIN_ROWS, 2 * old_rows if rows > old_rows else old_rows)
        spare_left = max(left, MIN_SPARE_COLUMNS, 2 * self.start if left > self.start else self.start)
        old_right = (self._k.shape[2] - self.end) if self._k is not None else 0
        spare_right = max(right, MIN_SPARE_COLUMNS, 2 * old_right if right > old_right else old_right)
        columns = spare_left + self.length + spare_right
        k = k_like.new_zeros(new_rows, k_like.shape[1], columns, k_like.shape[3])
        v = v_like.new_zeros(new_rows, v_like.shape[1], columns, v_like.shape[3])
        if self._k is not None and self.rows and self.length:
            k[:self.rows, :, spare_left:spare_left + self.length] = self._k[:self.rows, :, self.start:self.end]
            v[:self.rows, :, spare_left:spare_left + self.length] = self._v[:self.rows, :, self.start:self.end]
        self._k, self._v = k, v
        self.start, self.end = spare_left, spare_left + self.length
        if not self.is_initialized:
            self.lazy_initialization(k, v)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A decode step: every row's new keys/values at column `end`."""
        new = key_states.shape[-2]
        self.reserve(self.rows, 0, new, key_states, value_states)
        self._k[:self.rows, :, self.end:self.end + new] = key_states
        self._v[:self.rows, :, self.end:self.end + new] = value_states
        self.end += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def add_rows(self, k_new: torch.Tensor, v_new: torch.Tensor, pads: list[int]) -> int:
        """Write a prefill's rows ([n, H, L, D], `pads[i]` left padding in row i) as the last rows,
        right-aligned; returns how many columns `start` moved left (extra padding of old rows)."""
        n, width = k_new.shape[0], k_new.shape[2]
        grow = max(0, width - self.length)
        self.reserve(self.rows + n, grow, 0, k_new, v_new)
        if grow:
            self._k[:self.rows, :, self.start - grow:self.start] = 0  # stale columns become padding
            self._v[:self.rows, :, self.start - grow:self.start] = 0
            self.start -= grow
        rows = slice(self.rows, self.rows + n)
        self._k[rows, :, self.start:self.end] = 0
        self._v[rows, :, self.start:self.end] = 0
        self._k[rows, :, self.end - width:self.end] = k_new
        self._v[rows, :, self.end - width:self.end] = v_new
        for i, pad in enumerate(pads):  # a pad position's KV is never attended to, but must be finite
            if pad:
                self._k[self.rows + i, :, self.end - width:self.end - width + pad] = 0
                self._v[self.rows + i, :, self.end - width:self.end - width + pad] = 0
        self.rows += n
        self._views()
        return grow

    def move_row(self, source: int, target: int) -> None:
        self._k[target, :, self.start:self.end] = self._k[source, :, self.start:self.end]
        self._v[target, :, self.start:self.end] = self._v[source, :, self.start:self.end]

    def shrink(self, rows: int, trim: int) -> None:
        """Keep the first `rows` rows; drop `trim` leading padding columns (no copy). An emptied
        batch keeps its buffers for the next one (see `release`)."""
        self.rows = rows
        self.start = self.start + trim if rows else self.end  # an empty batch has no columns either
        if self._k is not None:
            self._views()

    def release(self) -> int:
        """Give an empty batch's buffers back; returns the bytes freed."""
        if self.rows or self._k is None:
            return 0
        freed = self._k.nbytes + self._v.nbytes
        self._k = self._v = None
        self.start = self.end = 0
        self.keys = self.values = None
        self.is_initialized = False
        return freed


class BatchKVCache(Cache):
    """KV cache of the running batch. Row i holds sequence i; `left_pad[i]` columns of padding
    precede its tokens, so its real length is `length - left_pad[i]`."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_RowLayer() for _ in range(num_layers)])
        self.left_pad: list[int] = []

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return len(self.left_pad)

    def append(self, prefilled: Cache, left_pads: list[int]) -> None:
        """Add the rows of a prefill (left-padded, `left_pads[i]` pad columns in row i) as the
        last rows; only those rows are copied."""
        new_len = prefilled.layers[0].get_seq_length()
        grow = 0
        for mine, theirs in zip(self.layers, prefilled.layers):
            grow = mine.add_rows(theirs.keys[:, :, :new_len], theirs.values[:, :, :new_len], left_pads)
        offset = self.length - new_len  # the new rows' extra padding on the left
        self.left_pad = [p + grow for p in self.left_pad] + [offset + pad for pad in left_pads]

    def remove_rows(self, rows: set[int]) -> list[int]:
        """Drop the rows in `rows`, filling each hole with the current last row (one row copied
        per hole); returns the new order: new row j holds what was row order[j]."""
        order = list(range(self.batch_size))
        for hole in sorted(rows, reverse=True):
            last = len(order) - 1
            if hole != last:
                for layer in self.layers:
                    layer.move_row(last, hole)
                order[hole] = order[last]
            order.pop()
        pads = [self.left_pad[i] for i in order]
        trim = min(pads) if pads else 0
        for layer in self.layers:
            layer.shrink(len(order), trim)
        self.left_pad = [p - trim for p in pads]
        return order

    def release(self) -> int:
        """Free the buffers while the batch is empty (bytes freed; 0 while any row runs).
        Leaving rows never frees them: on a CPU host returning ~250 MB to the OS took ~0.25 s
        (measured), paid by the step that emptied the batch and again, in page faults, by the
        next batch's first prefill; the scheduler calls this once the engine has been idle a while."""
        if self.batch_size:
            return 0
        return sum(layer.release() for layer in self.layers)

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention mask [B, T+1], position ids [B, 1] and cache position [1] for one decode step."""
        total = self.length + 1
        pads = torch.tensor(self.left_pad, device=device)
        columns = torch.arange(total, device=device)
        attention_mask = (columns[None, :] >= pads[:, None]).long()  # [B, T+1]
        position_ids = (self.length - pads)[:, None]  # [B, 1]
        cache_position = torch.tensor([self.length], device=device)
        return attention_mask, position_ids, cache_position
