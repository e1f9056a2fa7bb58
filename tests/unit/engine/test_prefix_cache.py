"""The native engine's adapter-aware prefix cache: a prompt that starts like an earlier one on the
same adapter version reuses that prefix's KV; across adapters, versions or the base it never
does; every output equals the uncached run's (PEFT's); memory stays within its bound."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import PeftReference, collect, greedy_request, running_engine

from loraserve.engine.prefix_cache import PrefixCache

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

SYSTEM = " ".join(f"rule {i}: answer about the sea and a red fox briefly" for i in range(12))


def _kv(length: int, layers: int = 2, fill: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill)) for _ in range(layers)]


# ---- the cache alone -------------------------------------------------------------------------
def test_a_shared_prefix_is_found_by_block_and_never_across_versions():
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    first = list(range(100, 111))  # 11 tokens: 2 whole blocks stored
    cache.store("a#1", first, _kv(11))
    length, kv = cache.lookup("a#1", list(range(100, 108)) + [7, 7, 7])  # shares 2 blocks
    assert length == 8 and kv[0][0].shape[2] == 8
    assert cache.lookup("a#1", list(range(100, 104)) + [9] * 8)[0] == 4  # only the first block
    assert cache.lookup("a#2", first)[1] is None  # another version of the same adapter
    assert cache.lookup(None, first)[1] is None  # the base
    assert cache.lookup("b#1", first)[1] is None  # another adapter
    assert cache.lookup("a#1", list(range(100, 108)))[0] == 4  # one token is always left to prefill
    assert (cache.stats.hits, cache.stats.misses, cache.stats.hit_tokens) == (3, 3, 16)


def test_memory_is_bounded_and_a_dropped_version_is_forgotten():
    one = PrefixCache(max_bytes=1 << 20, block=4)
    one.store("a#1", list(range(8)), _kv(8))
    per_entry = one.nbytes
    cache = PrefixCache(max_bytes=3 * per_entry, block=4)
    for i in range(5):
        cache.store("a#1", [i] * 8, _kv(8))
    assert len(cache) == 3 and cache.nbytes <= 3 * per_entry
    assert cache.lookup("a#1", [0] * 9)[1] is None and cache.lookup("a#1", [4] * 9)[1] is not None
    cache.store("b#1", [9] * 8, _kv(8))
    cache.drop_version("a#1")
    assert len(cache) == 1 and cache.lookup("a#1", [4] * 9)[1] is None and cache.lookup("b#1", [9] * 9)[0] == 8
    assert PrefixCache(max_bytes=0).lookup("a#1", [1] * 40) == (0, None)  # off


def test_the_stored_kv_is_a_copy():
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    kv = _kv(8)
    cache.store("a#1", list(range(8)), kv)
    kv[0][0].fill_(5.0)
    assert float(cache.lookup("a#1", list(range(9)))[1][0][0].max()) == 1.0


# ---- in the engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["deepseek-v3", "deepseek-llm"])
def test_reuse_within_an_adapter_gives_pefts_tokens_and_nothing_crosses_adapters(base_dirs, adapter_dirs, arch):
    adapters = adapter_dirs(arch)
    names = ["all-r16", "att-r8-rs"]
    reference = PeftReference(base_dirs[arch], "none")
    with running_engine(base_dirs[arch], "none", {n: adapters[n] for n in names}, max_prefill_tokens=32) as engine:
        system = engine.encode(SYSTEM)
        prompts = [system + engine.encode(f"Question {i}: what about the moon?")[1:] for i in range(2)]

        def run(adapter, ids):
            before = engine.stats()
            _, finish = collect(engine.submit(greedy_request(ids, 8, adapter)))
            after = engine.stats()
            want = reference.greedy(adapters[adapter] if adapter else None, ids, 8)
            assert finish.token_ids == want, (adapter, finish.token_ids, want)
            return after.prefix_cache_hit_tokens_total - before.prefix_cache_hit_tokens_total
        assert run(names[0], prompts[0]) == 0  # first: nothing cached yet
        saved = run(names[0], prompts[1])  # same adapter, same system prompt: reused
        assert saved >= len(system) - 16, (saved, len(system))
        assert run(names[1], prompts[1]) == 0  # another adapter: never its KV
        assert run(None, prompts[1]) == 0  # the base: never an adapter's KV
        assert run(None, prompts[0]) > 0  # the base's own prefix, stored by the run before
        assert engine.stats().prefix_cache_bytes > 0


def test_replacing_an_adapter_drops_its_prefixes(base_dirs, adapter_dirs):
    adapters = adapter_dirs("deepseek-llm")
    with running_engine(base_dirs["deepseek-llm"], "none", {"a": adapters["all-r16"]}, max_prefill_tokens=32) as engine:
        ids = engine.encode(SYSTEM)
        collect(engine.submit(greedy_request(ids, 2, "a")))
        held = engine.stats().prefix_cache_bytes
        assert held > 0
        engine.add_adapter("a", adapters["att-r16"], replace=True)
        assert engine.stats().prefix_cache_bytes < held
        before = engine.stats().prefix_cache_hits_total
        _, finish = collect(engine.submit(greedy_request(ids, 4, "a")))
        assert engine.stats().prefix_cache_hits_total == before  # the new version starts cold
        want = PeftReference(base_dirs["deepseek-llm"], "none").greedy(adapters["att-r16"], ids, 4)
        assert finish.token_ids == want
