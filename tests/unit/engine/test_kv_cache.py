"""The batch KV layout: a sequence joining or leaving copies only itself (the buffers stay where
they are while their spare lasts), rows keep their own tokens through joins and leaves, and
padding is always zero. Real transformers caches of made-up KV, no model."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from loraserve.engine.kv_cache import BatchKVCache

H, D = 2, 4


def _prefill(lengths: list[int], base: float) -> tuple[DynamicCache, list[int]]:
    """A left-padded prefill of len(lengths) prompts: row i's token t holds base + 100 i + t."""
    longest = max(lengths)
    k = torch.zeros(len(lengths), H, longest, D)
    for i, n in enumerate(lengths):
        k[i, :, longest - n:] = (base + 100 * i + torch.arange(n, dtype=torch.float32))[None, :, None]
    cache = DynamicCache()
    cache.update(k, -k, 0)
    return cache, [longest - n for n in lengths]


def _tokens(cache: BatchKVCache, row: int) -> list[float]:
    keys = cache.layers[0].keys[row, 0, :, 0]
    return keys[cache.left_pad[row]:].tolist()


def test_join_and_leave_copy_only_the_sequence_and_keep_every_rows_tokens():
    cache = BatchKVCache(1)
    cache.append(*_prefill([5, 3], base=0.0))  # rows: a (5 tokens), b (3)
    buffer = cache.layers[0]._k.data_ptr()
    cache.append(*_prefill([4], base=1000.0))  # c, shorter than the batch: only its row is written
    cache.append(*_prefill([9], base=2000.0))  # d, longer: the others get padding from the spare
    assert cache.layers[0]._k.data_ptr() == buffer
    assert _tokens(cache, 0) == list(range(5)) and _tokens(cache, 1) == [100.0, 101.0, 102.0]
    assert _tokens(cache, 2) == [1000.0 + t for t in range(4)] and _tokens(cache, 3) == [2000.0 + t for t in range(9)]
    order = cache.remove_rows({0, 3})  # the longest leaves: padding no one needs is dropped
    assert cache.layers[0]._k.data_ptr() == buffer and sorted(order) == [1, 2]
    assert {tuple(_tokens(cache, j)) for j in range(2)} == {(100.0, 101.0, 102.0), tuple(1000.0 + t for t in range(4))}
    assert cache.length == 4 and min(cache.left_pad) == 0
    for row in range(cache.batch_size):  # padding is zero, keys and values alike
        pad = cache.left_pad[row]
        assert not cache.layers[0].keys[row, :, :pad].any() and not cache.layers[0].values[row, :, :pad].any()


def test_a_decode_step_writes_each_row_at_the_shared_end():
    cache = BatchKVCache(1)
    cache.append(*_prefill([2, 4], base=0.0))
    step = torch.full((2, H, 1, D), 7.0)
    keys, values = cache.layers[0].update(step, -step)
    assert keys.shape == (2, H, 5, D) and (keys[:, :, -1] == 7).all() and (values[:, :, -1] == -7).all()
    assert _tokens(cache, 0) == [0.0, 1.0, 7.0]


def test_an_emptied_batch_keeps_its_buffers_for_the_next_and_release_frees_them():
    cache = BatchKVCache(1)
    cache.append(*_prefill([3], base=0.0))
    buffer = cache.layers[0]._k.data_ptr()
    assert cache.release() == 0  # a row still runs: nothing is freed
    cache.remove_rows({0})
    assert cache.batch_size == 0 and cache.length == 0 and cache.layers[0]._k.data_ptr() == buffer
    cache.append(*_prefill([6, 2], base=5.0))  # longer than the last batch: placed in the same buffers
    assert cache.layers[0]._k.data_ptr() == buffer
    assert _tokens(cache, 0) == [5.0 + t for t in range(6)] and _tokens(cache, 1) == [105.0, 106.0]
    assert not cache.layers[0].keys[1, :, :cache.left_pad[1]].any()  # the old batch's values are not padding
    cache.remove_rows({0, 1})
    held = cache.layers[0]._k.nbytes * 2
    assert cache.release() == held and cache.layers[0]._k is None
    cache.append(*_prefill([4], base=9.0))  # and a released cache allocates again
    assert _tokens(cache, 0) == [9.0 + t for t in range(4)]


def test_a_batch_after_one_that_used_up_the_spare_starts_with_the_spare_again():
    cache = BatchKVCache(1)
    cache.append(*_prefill([3], base=0.0))
    layer = cache.layers[0]
    step = torch.ones(1, H, 1, D)
    while layer.end < layer._k.shape[2]:  # decode until the right spare is gone
        layer.update(step, step)
    buffer, columns = layer._k.data_ptr(), layer._k.shape[2]
    cache.remove_rows({0})
    cache.append(*_prefill([5], base=1.0))
    for _ in range(columns // 2):  # the next batch decodes in the same buffers
        layer.update(2 * step, 2 * step)
    assert layer._k.data_ptr() == buffer and _tokens(cache, 0)[:5] == [1.0 + t for t in range(5)]
