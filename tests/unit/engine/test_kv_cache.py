"""The KV layout: every sequence owns a region of the arena for its whole life. Joining or
leaving the batch copies nothing (no buffer moves, no other row's tokens are touched), a decode
step writes each row's token at its own position and reads each row's own tokens in place, and
admission knows what fits. Real transformers cache layers with made-up KV, no model."""

from __future__ import annotations

import pytest
import torch

from loraserve.engine.kv_arena import TokenArena
from loraserve.engine.kv_cache import BatchKVCache, RowViews

H, D = 2, 4


def _prompt_kv(lengths: list[int], base: float) -> tuple[torch.Tensor, list[int]]:
    """Left-padded keys of len(lengths) prompts: row i's token t holds base + 100 i + t (padding: NaN,
    which must never reach a region)."""
    longest = max(lengths)
    k = torch.full((len(lengths), H, longest, D), float("nan"))
    for i, n in enumerate(lengths):
        k[i, :, longest - n:] = (base + 100 * i + torch.arange(n, dtype=torch.float32))[None, :, None]
    return k, [longest - n for n in lengths]


def _prefill(cache: BatchKVCache, lengths: list[int], base: float, extra: int = 8) -> list:
    regions = [cache.reserve(n + extra) for n in lengths]
    k, pads = _prompt_kv(lengths, base)
    cache.begin_prefill(regions, pads)
    returned, _ = cache.layers[0].update(k, -k)
    assert returned is k  # a prefill attends to its own padded batch
    cache.end_forward(lengths)
    for region in regions:
        cache.join(region)
    return regions


def _tokens(cache: BatchKVCache, region) -> list[float]:
    keys, values = cache.layers[0].views(region, 0, region.length)
    assert torch.equal(values, -keys)
    return keys[0, 0, :, 0].tolist()


def _decode(cache: BatchKVCache, value: float):
    step = torch.full((cache.batch_size, H, 1, D), value)
    cache.begin_decode()
    out = cache.layers[0].update(step, -step)
    cache.end_forward([1] * cache.batch_size)
    return out


def test_join_and_leave_copy_nothing_and_keep_every_rows_tokens():
    cache = BatchKVCache(1, capacity_tokens=200)
    a, b = _prefill(cache, [5, 3], base=0.0)
    buffer = cache.layers[0].k.data_ptr()
    (c,) = _prefill(cache, [4], base=1000.0)
    (d,) = _prefill(cache, [30], base=2000.0)  # longer than every row: nobody else is touched
    assert cache.layers[0].k.data_ptr() == buffer
    assert _tokens(cache, a) == list(range(5)) and _tokens(cache, b) == [100.0, 101.0, 102.0]
    assert _tokens(cache, c) == [1000.0 + t for t in range(4)] and _tokens(cache, d) == [2000.0 + t for t in range(30)]
    before = cache.layers[0].k.clone()
    order = cache.remove_rows({0, 3})
    assert order == [1, 2] and cache.rows == [b, c]
    assert torch.equal(cache.layers[0].k.nan_to_num(), before.nan_to_num())  # nothing written on leaving
    assert cache.arena.used == b.capacity + c.capacity  # a's and d's ranges are free again


def test_a_decode_step_writes_each_row_at_its_own_position_and_reads_it_in_place():
    cache = BatchKVCache(1, capacity_tokens=100)
    a, b = _prefill(cache, [2, 4], base=0.0)
    keys, values = _decode(cache, 7.0)
    assert isinstance(keys, RowViews) and len(keys) == 2
    assert keys[0].shape == (1, H, 3, D) and keys[1].shape == (1, H, 5, D)
    assert keys[0].data_ptr() == cache.layers[0].views(a, 0, 1)[0].data_ptr()  # a view, not a copy
    assert _tokens(cache, a) == [0.0, 1.0, 7.0] and _tokens(cache, b) == [100.0, 101.0, 102.0, 103.0, 7.0]
    assert torch.equal(values[1], -keys[1])


def test_mla_decode_gathers_right_aligned_rows_with_finite_padding_and_its_mask():
    cache = BatchKVCache(1, capacity_tokens=100, gather_decode=True)
    _prefill(cache, [2, 4], base=0.0)
    mask, positions = cache.decode_inputs(torch.device("cpu"))
    assert positions.tolist() == [[2], [4]]
    assert mask[:, 0, 0].tolist() == [[False, False, True, True, True], [True] * 5]
    keys, _ = _decode(cache, 7.0)
    assert keys.shape == (2, H, 5, D) and torch.isfinite(keys).all()
    assert keys[0, 0, 2:, 0].tolist() == [0.0, 1.0, 7.0] and keys[1, 0, :, 0].tolist() == [100, 101, 102, 103, 7]


def test_a_chunk_writes_after_the_region_tokens_and_attends_to_all_of_them():
    cache = BatchKVCache(1, capacity_tokens=100)
    region = cache.reserve(12)
    for start, n in ((0, 4), (4, 5)):
        chunk = (start + torch.arange(n, dtype=torch.float32))[None, None, :, None].expand(1, H, n, D)
        cache.begin_chunk(region)
        assert cache.get_seq_length() == start  # the mask's offset: the chunk follows what is there
        keys, values = cache.layers[0].update(chunk, -chunk)
        cache.end_forward([n])
        assert keys.shape == (1, H, start + n, D) and keys[0, 0, :, 0].tolist() == list(range(start + n))
    assert cache.batch_size == 0  # not in the batch until it joins
    cache.join(region)
    assert cache.batch_size == 1 and _tokens(cache, region) == list(range(9))
    cache.begin_chunk(region)
    with pytest.raises(RuntimeError, match="past its KV region"):
        cache.layers[0].update(torch.zeros(1, H, 4, D), torch.zeros(1, H, 4, D))


def test_a_cached_prefix_is_copied_into_the_region():
    cache = BatchKVCache(2, capacity_tokens=50)
    prefix = [(torch.full((1, H, 6, D), float(i)), torch.full((1, H, 6, D), -float(i))) for i in range(2)]
    region = cache.reserve(10)
    cache.write_prefix(region, prefix)
    assert region.length == 6
    for layer, (k, v) in zip(cache.layers, prefix):
        mine_k, mine_v = layer.views(region, 0, 6)
        assert torch.equal(mine_k, k) and torch.equal(mine_v, v) and mine_k.data_ptr() != k.data_ptr()


def test_release_frees_the_buffers_only_while_no_region_is_taken():
    cache = BatchKVCache(1, capacity_tokens=64)
    (a,) = _prefill(cache, [3], base=0.0)
    assert cache.release() == 0 and cache.allocated
    cache.remove_rows({0})
    assert cache.release() == 2 * 64 * H * D * 4 and not cache.allocated
    (b,) = _prefill(cache, [5], base=9.0)  # allocated again on the next write
    assert _tokens(cache, b) == [9.0 + t for t in range(5)]


def test_the_arena_takes_first_fit_ranges_and_coalesces_what_is_freed():
    arena = TokenArena(100)
    a, b, c = arena.allocate(30), arena.allocate(30), arena.allocate(30)
    assert (a, b, c) == (0, 30, 60) and arena.largest_free() == 10 and arena.allocate(11) is None
    arena.free(b, 30)
    assert arena.allocate(25) == 30 and arena.largest_free() == 10  # first fit: b's hole
    arena.free(30, 25)
    arena.free(a, 30)
    arena.free(c, 30)
    assert arena.free_ranges() == [(0, 100)] and arena.used == 0
    with pytest.raises(ValueError, match="freed twice"):
        arena.free(10, 5)
