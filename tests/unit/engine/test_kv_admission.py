"""Admission checks KV memory (native engine): a request whose KV would not fit beside the
running batch's waits until it does, one that could never fit is RESOURCE_EXHAUSTED at once,
and nothing fails with an out-of-memory error."""

from __future__ import annotations

import pytest
from model_fixtures import collect, greedy_request, running_engine

from loraserve.errors import ResourceExhausted

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_a_request_that_cannot_fit_is_refused_and_one_that_does_not_fit_yet_waits(base_dirs):
    base = base_dirs["deepseek-llm"]
    with running_engine(base, "none") as probe:
        per_token = probe._scheduler.runner.kv_bytes_per_token()
    with running_engine(base, "none", kv_cache_bytes=per_token * 100) as engine:
        assert engine._scheduler.kv_token_rows == 100
        ids = engine.encode("Story about the moon")
        with pytest.raises(ResourceExhausted, match=r"KV memory for \d+ tokens.*holds 100"):
            engine.submit(greedy_request(ids, 101 - len(ids) + 1))
        n = 60 - len(ids)  # two of these need 2 x 60 > 100: the second waits for the first
        first, second = greedy_request(ids, n), greedy_request(ids, n)
        streams = [engine.submit(first), engine.submit(second)]
        (_, a), (_, b) = collect(streams[0]), collect(streams[1])
        assert a.completion_tokens == b.completion_tokens == n
        assert second.arrival + b.timings.queue_s >= first.arrival + a.timings.total_s - 1e-3
        small = [greedy_request(ids, 40 - len(ids)) for _ in range(2)]  # 2 x 40 fits: together
        small_streams = [engine.submit(r) for r in small]
        outs = [collect(stream)[1] for stream in small_streams]
        assert small[1].arrival + outs[1].timings.queue_s < small[0].arrival + outs[0].timings.total_s


def test_the_batch_kv_outlives_an_empty_batch_and_is_freed_once_the_engine_idles(base_dirs):
    """Freeing the buffers when the last sequence leaves cost that step ~0.25 s on a CPU host
    (and the next batch's first prefill its page faults): they are kept, reused by the next
    batch with the same tokens, and freed only after the engine has idled for a while."""
    import time

    with running_engine(base_dirs["deepseek-llm"], "none") as engine:
        scheduler = engine._scheduler
        scheduler.kv_release_idle_s = 3600.0
        held = lambda: engine._on_engine(lambda: scheduler.runner.cache.allocated)  # noqa: E731
        ids = engine.encode("Story about the moon")
        longer = engine.encode("A much longer story about the moon, the sea and the old lighthouse keeper")
        first = [collect(engine.submit(greedy_request(p, 12)))[1].token_ids for p in (ids, longer)]
        assert held()
        again = [collect(engine.submit(greedy_request(p, 12)))[1].token_ids for p in (longer, ids)][::-1]
        assert again == first  # the kept buffers' old values never reach a new batch
        engine.set_idle_wait(0.05)
        scheduler.kv_release_idle_s = 0.2
        deadline = time.monotonic() + 10
        while held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not held()
        assert collect(engine.submit(greedy_request(ids, 12)))[1].token_ids == first[0]
