"""The native engine's KV cache: every sequence owns a region of one buffer pair per layer for
its whole life, so joining or leaving the batch copies nothing.

Layout, per layer: keys in one buffer of N * Hk vectors of Dk values (N = the KV budget in
tokens), values likewise (N * Hv vectors of Dv). A sequence admitted with room for `capacity`
tokens (its prompt and every token it may generate: `Sequence.kv_need`) owns the token range
[offset, offset + capacity) of the arena (`kv_arena.TokenArena`), laid out head-major: its keys
are the [Hk, capacity, Dk] block at vector offset * Hk, so any prefix of one head is contiguous.
- Prefill writes a prompt's tokens into its own region: a padded batch of whole prompts each
  its real tokens, a chunk of a long prompt at its position (attending to the region's earlier
  tokens in place). A cached prefix is copied in (the sequence's own copy).
- A decode step writes every row's new token at its own position (one index_copy per layer).
  On a CPU host, attention then reads each row's own tokens where they are (`row_attention`,
  one product per row over exactly its length: no padding to the longest row, no copy). With
  `gather_decode` the step instead gathers the rows into a right-aligned padded batch, read by
  one batched attention: on MLA bases (DeepSeek-V2/V3: a latent per token, expanded through
  kv_b_proj after the cache returns it, as transformers' expansion and the absorbed decode take
  it; the latent is a fraction of the expanded keys and values) and on CUDA devices, where a
  kernel launch per row and layer would cost more than the gather.
- A sequence joins the batch as one more row and leaves it by giving its range back.
So no sequence's KV is ever moved, grown or copied after it is written, and the memory a request
may take is known at admission: one that cannot fit waits (`can_reserve`), never fails mid-step.
The buffers are allocated on the first write (on a CPU host the pages are only committed as
written) and kept while the engine works; `release` frees them once it has idled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from loraserve.engine.kv_arena import TokenArena

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer: keys and values [1, H, T, D] of one sequence's tokens."""


@dataclass(eq=False)
class SequenceKV:
    """One sequence's region of the arena."""

    offset: int
    """Its first token position."""
    capacity: int
    length: int = 0
    """Tokens written so far."""


class RowViews:
    """A decode step's keys (or values) of one layer: row i's tokens 0..lengths[i]-1 (this
    step's included) as a [1, H, T_i, D] view of the buffer."""

    def __init__(self, buffer: torch.Tensor, heads: int, rows: list[SequenceKV], lengths: list[int]) -> None:
        self.buffer, self.heads = buffer, heads
        self.rows, self.lengths = rows, lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _region_view(self.buffer, self.heads, self.rows[i], 0, self.lengths[i])


def _region_view(buffer: torch.Tensor, heads: int, region: SequenceKV, start: int, end: int) -> torch.Tensor:
    """Tokens start..end-1 of `region` in a [N * H, D] buffer, as [1, H, end - start, D]."""
    d = buffer.shape[1]
    return buffer.as_strided((1, heads, end - start, d), (heads * region.capacity * d, region.capacity * d, d, 1),
                             (region.offset * heads + start) * d)


class _ArenaLayer(DynamicLayer):
    """One layer's buffers; what `update` does depends on the forward the cache is in."""

    def __init__(self, owner: BatchKVCache) -> None:
        super().__init__()
        self.owner = owner
        self.k: torch.Tensor | None = None  # [N * Hk, Dk]
        self.v: torch.Tensor | None = None  # [N * Hv, Dv]
        self.heads_k = self.heads_v = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers for shapes [*, H, *, D] like these."""
        n = self.owner.arena.capacity
        self.heads_k, self.heads_v = key_states.shape[1], value_states.shape[1]
        self.k = key_states.new_empty(n * self.heads_k, key_states.shape[3])
        self.v = value_states.new_empty(n * self.heads_v, value_states.shape[3])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.k is None:
            self.lazy_initialization(key_states, value_states)
        return self.owner._update(self, key_states, value_states)

    def views(self, region: SequenceKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (_region_view(self.k, self.heads_k, region, start, end),
                _region_view(self.v, self.heads_v, region, start, end))

    def get_seq_length(self) -> int:
        return self.owner._seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner._seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def release(self) -> int:
        if self.k is None:
            return 0
        freed = self.k.nbytes + self.v.nbytes
        self.k = self.v = None
        self.is_initialized = False
        return freed


class BatchKVCache(Cache):
    """The arena's regions, the running batch's rows (row i: `rows[i]`), and the forward being
    run (`begin_*` before it, `end_forward` after it succeeded)."""

    def __init__(self, num_layers: int, capacity_tokens: int, gather_decode: bool = False) -> None:
        super().__init__(layers=[_ArenaLayer(self) for _ in range(num_layers)])
        self.arena = TokenArena(capacity_tokens)
        self.gather_decode = gather_decode
        self.rows: list[SequenceKV] = []
        self._mode = ""
        self._targets: list[SequenceKV] = []  # the regions the forward writes, in its row order
        self._pads: list[int] = []
        self._seen = 0  # what transformers' mask code takes as the cached length
        self._step_lengths: list[int] = []  # a decode step: each row's length with this step's token
        self._index: dict[tuple[int, str], torch.Tensor] = {}  # per-forward index tensors, by (heads, kind)

    # ---- regions ---------------------------------------------------------------------------
    def can_reserve(self, tokens: int) -> bool:
        return self.arena.largest_free() >= tokens

    def reserve(self, tokens: int) -> SequenceKV | None:
        """A region for `tokens` tokens, or None while no free range is that long."""
        offset = self.arena.allocate(tokens)
        return None if offset is None else SequenceKV(offset, tokens)

    def free(self, region: SequenceKV) -> None:
        self.arena.free(region.offset, region.capacity)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def join(self, region: SequenceKV) -> None:
        """A prefilled sequence becomes the batch's last row (nothing copied)."""
        self.rows.append(region)

    def remove_rows(self, rows: set[int]) -> list[int]:
        """Drop the rows in `rows` and give their regions back; returns the new order (new row j
        is what was row order[j]: the others keep their relative order). Nothing is copied."""
        order = [i for i in range(len(self.rows)) if i not in rows]
        for i in rows:
            self.free(self.rows[i])
        self.rows = [self.rows[i] for i in order]
        return order

    def release(self) -> int:
        """Free the buffers while no region is taken (bytes freed; 0 otherwise). Never on a step:
        on a CPU host returning ~250 MB to the OS took ~0.25 s (measured); the scheduler calls
        this once the engine has been idle a while."""
        if self.arena.used:
            return 0
        return sum(layer.release() for layer in self.layers)

    @property
    def allocated(self) -> bool:
        return self.layers[0].k is not None

    # ---- forwards ---------------------------------------------------------------------------
    def begin_prefill(self, regions: list[SequenceKV], pads: list[int]) -> None:
        """Whole prompts in one left-padded forward: row i's real tokens (after `pads[i]`) go to
        the start of `regions[i]`."""
        self._begin("prefill", regions, 0)
        self._pads = pads

    def begin_chunk(self, region: SequenceKV) -> None:
        """A chunk of one prompt, written after the `region.length` tokens already there."""
        self._begin("chunk", [region], region.length)

    def begin_decode(self) -> None:
        """One new token for every row of the batch."""
        self._begin("decode", self.rows, max((r.length for r in self.rows), default=0))
        self._step_lengths = [r.length + 1 for r in self.rows]  # the same for every layer of the step

    def _begin(self, mode: str, targets: list[SequenceKV], seen: int) -> None:
        self._mode, self._targets, self._seen = mode, targets, seen
        self._index = {}

    def end_forward(self, written: list[int]) -> None:
        """The forward succeeded: `written[i]` tokens were added to its i-th region."""
        for region, n in zip(self._targets, written):
            region.length += n
        self._mode, self._targets, self._index = "", [], {}

    def _update(self, layer: _ArenaLayer, k: torch.Tensor, v: torch.Tensor):
        if self._mode == "decode":
            layer.k.index_copy_(0, self._positions(layer.heads_k), k.reshape(-1, k.shape[-1]))  # [B, Hk, 1, Dk]
            layer.v.index_copy_(0, self._positions(layer.heads_v), v.reshape(-1, v.shape[-1]))
            lengths = self._step_lengths
            if self.gather_decode:
                return (layer.k.index_select(0, self._gather(layer.heads_k)).view(len(lengths), layer.heads_k, -1,
                                                                                   k.shape[-1]),
                        layer.v.index_select(0, self._gather(layer.heads_v)).view(len(lengths), layer.heads_v, -1,
                                                                                   v.shape[-1]))
            return RowViews(layer.k, layer.heads_k, self._targets, lengths), \
                RowViews(layer.v, layer.heads_v, self._targets, lengths)
        if self._mode == "chunk":
            region = self._targets[0]
            start, end = region.length, region.length + k.shape[2]
            if end > region.capacity:
                raise RuntimeError(f"a prompt chunk runs past its KV region ({end} > {region.capacity} tokens)")
            mine_k, mine_v = layer.views(region, start, end)
            mine_k.copy_(k)
            mine_v.copy_(v)
            return layer.views(region, 0, end)
        if self._mode == "prefill":
            width = k.shape[2]
            for i, (region, pad) in enumerate(zip(self._targets, self._pads)):
                if width - pad > region.capacity:
                    raise RuntimeError(f"a prompt runs past its KV region ({width - pad} > {region.capacity} tokens)")
                mine_k, mine_v = layer.views(region, 0, width - pad)
                mine_k.copy_(k[i:i + 1, :, pad:])
                mine_v.copy_(v[i:i + 1, :, pad:])
            return k, v
        raise RuntimeError("the batch KV cache was used outside a forward the runner began")

    def _positions(self, heads: int) -> torch.Tensor:
        """[B * heads] buffer vectors where each row's new token goes, head by head."""
        key = (heads, "write")
        index = self._index.get(key)
        if index is None:
            index = torch.tensor([r.offset * heads + h * r.capacity + r.length
                                  for r in self._targets for h in range(heads)], device=self.layers[0].device)
            self._index[key] = index
        return index

    def _gather(self, heads: int) -> torch.Tensor:
        """[B * heads * T] buffer vectors of the rows right-aligned on T = the longest row (its
        new token included); a row's padding repeats its first token (finite, masked out)."""
        key = (heads, "gather")
        index = self._index.get(key)
        if index is None:
            lengths = torch.tensor(self._step_lengths)  # [B]
            width = int(lengths.max())
            column = torch.arange(width)[None, :] - (width - lengths)[:, None]  # [B, T], < 0 in the padding
            base = torch.tensor([[r.offset * heads + h * r.capacity for h in range(heads)]
                                 for r in self._targets])  # [B, H]
            index = (base[:, :, None] + column.clamp(min=0)[:, None, :]).reshape(-1).to(self.layers[0].device)
            self._index[key] = index
        return index

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """For one decode step: the attention mask ([B, 1, 1, T] bool, right-aligned rows, only
        with `gather_decode`; None where attention reads each row in place) and position ids [B, 1]."""
        lengths = torch.tensor([r.length for r in self.rows], device=device)
        mask = None
        if self.gather_decode:
            width = int(lengths.max()) + 1
            mask = (torch.arange(width, device=device)[None, :] >= (width - 1 - lengths)[:, None])[:, None, None, :]
        return mask, lengths[:, None]

    # ---- a sequence's own tokens ---------------------------------------------------------------
    def prompt_kv(self, region: SequenceKV, tokens: int) -> KV:
        """Views of its first `tokens` tokens, per layer (for the prefix cache, which copies them)."""
        return [layer.views(region, 0, tokens) for layer in self.layers]

    def write_prefix(self, region: SequenceKV, kv: KV) -> None:
        """Copy a cached prefix (per layer [1, H, T, D] keys and values) to the start of `region`."""
        for layer, (k, v) in zip(self.layers, kv):
            if layer.k is None:
                layer.lazy_initialization(k, v)
            mine_k, mine_v = layer.views(region, 0, k.shape[2])
            mine_k.copy_(k)
            mine_v.copy_(v)
        region.length = kv[0][0].shape[2]
