"""The running batch's KV cache: one padded tensor pair per layer, rows aligned on the right.

Every row of the batch shares one time axis of length `length`; a sequence shorter than the
batch's longest sits at the right end of its row and the columns before it are padding (zeros,
masked out of attention). This lets a sequence whose prefill ran alone join a batch that is
already decoding, and lets a finished sequence leave by dropping its row, while the model sees
an ordinary transformers `Cache`. The whole layout lives in this class, so a paged layout can
replace it without touching the scheduler or runner.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _PaddedLayer(DynamicLayer):
    """One layer's keys/values in a buffer with spare time capacity, so a decode step writes in
    place instead of concatenating the whole history (DynamicLayer's O(T) copy per token)."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None  # [B, H, capacity, Dk]
        self._v: torch.Tensor | None = None  # [B, H, capacity, Dv]
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _ensure_capacity(self, batch: int, need: int, k_like: torch.Tensor, v_like: torch.Tensor) -> None:
        if self._k is not None and self._k.shape[0] == batch and self._k.shape[2] >= need:
            return
        capacity = max(need, 16, 2 * (self._k.shape[2] if self._k is not None else 0))
        k = k_like.new_zeros(batch, k_like.shape[1], capacity, k_like.shape[3])
        v = v_like.new_zeros(batch, v_like.shape[1], capacity, v_like.shape[3])
        if self._k is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self._ensure_capacity(key_states.shape[0], self.length + new, key_states, value_states)
        self._k[:, :, self.length : self.length + new] = key_states
        self._v[:, :, self.length : self.length + new] = value_states
        self.length += new
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def set_rows(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Replace the content with `k`/`v` ([B, H, T, D]); spare capacity is re-grown lazily."""
        self._k, self._v = k, v
        self.length = 0 if k is None else k.shape[2]
        self.keys = k
        self.values = v
        self.is_initialized = k is not None
        if k is not None:
            self.dtype, self.device = k.dtype, k.device


class BatchKVCache(Cache):
    """KV cache of the running batch. Row i holds sequence i; `left_pad[i]` columns of padding
    precede its tokens, so its real length is `length - left_pad[i]`."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_PaddedLayer() for _ in range(num_layers)])
        self.left_pad: list[int] = []

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return len(self.left_pad)

    def append(self, prefilled: Cache, left_pads: list[int]) -> None:
        """Add the rows of a prefill batch (left-padded, `left_pads[i]` pad columns in row i) as
        the last rows. Pad columns are zeroed: a pad position's keys/values are never attended
        to, but must be finite, or 0 * NaN would leak into the attention sum."""
        new_len = prefilled.layers[0].get_seq_length()
        total = max(self.length, new_len)
        shift = total - self.length  # extra padding every existing row needs on the left
        offset = total - new_len  # extra padding every new row needs on the left
        n_new = len(left_pads)
        for mine, theirs in zip(self.layers, prefilled.layers):
            k_new, v_new = theirs.keys[:, :, :new_len], theirs.values[:, :, :new_len]
            b = mine.keys.shape[0] if self.left_pad else 0
            k = k_new.new_zeros(b + n_new, k_new.shape[1], total, k_new.shape[3])
            v = v_new.new_zeros(b + n_new, v_new.shape[1], total, v_new.shape[3])
            if b:
                k[:b, :, shift:] = mine.keys
                v[:b, :, shift:] = mine.values
            k[b:, :, offset:] = k_new
            v[b:, :, offset:] = v_new
            for i, pad in enumerate(left_pads):
                if pad:
                    k[b + i, :, offset:offset + pad] = 0
                    v[b + i, :, offset:offset + pad] = 0
            mine.set_rows(k, v)
        self.left_pad = [p + shift for p in self.left_pad] + [offset + pad for pad in left_pads]

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows in `keep` (in that order), freeing the others' memory, then drop
        padding columns that no remaining row needs."""
        if not keep:
            for layer in self.layers:
                layer.set_rows(None, None)
            self.left_pad = []
            return
        pads = [self.left_pad[i] for i in keep]
        trim = min(pads)
        index = torch.tensor(keep, device=self.layers[0].keys.device)
        for layer in self.layers:
            k = layer.keys.index_select(0, index)[:, :, trim:].contiguous()
            v = layer.values.index_select(0, index)[:, :, trim:].contiguous()
            layer.set_rows(k, v)
        self.left_pad = [p - trim for p in pads]

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention mask [B, T+1], position ids [B, 1] and cache position [1] for one decode step."""
        total = self.length + 1
        pads = torch.tensor(self.left_pad, device=device)
        columns = torch.arange(total, device=device)
        attention_mask = (columns[None, :] >= pads[:, None]).long()  # [B, T+1]
        position_ids = (self.length - pads)[:, None]  # [B, 1]
        cache_position = torch.tensor([self.length], device=device)
        return attention_mask, position_ids, cache_position
