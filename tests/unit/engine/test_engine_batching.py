"""Continuous batching over many adapters: requests join a running batch, wait for a slot while
others proceed, and survive adapters being evicted and removed under load with exactly the
tokens of an undisturbed run.

Times compared below are the engine's own (request arrival plus the FinishEvent's timings), so
the orderings asserted are those of the engine thread, not of the threads reading the streams.
"""

from __future__ import annotations

import pytest
from model_fixtures import (
    ADAPTER_SPECS,
    PROMPTS,
    collect,
    finished_at,
    first_token_at,
    greedy_request,
    running_engine,
)

from loraserve.engine.request import FinishEvent, GenerationRequest, TokenEvent
from loraserve.errors import AdapterNotFound

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

ARCH = "deepseek-v3"  # MLA + MoE: the arch whose batching has the most to get wrong
NAMES = [spec.name for spec in ADAPTER_SPECS]


def test_request_joins_a_running_batch_mid_decode(base_dirs, adapter_dirs) -> None:
    """A request submitted while eight long ones decode gets its first token, and finishes,
    before any of them ends; the eight give the same tokens as without it."""
    adapters = adapter_dirs(ARCH)
    with running_engine(base_dirs[ARCH], "nf4", adapters, max_loras=4, max_batch_size=16) as engine:
        long_specs = [(NAMES[i % 4] if i % 3 else None, engine.encode(PROMPTS[i]), 96) for i in range(8)]

        def submit_long() -> tuple[list[GenerationRequest], list]:
            requests = [greedy_request(p, n, a) for a, p, n in long_specs]
            return requests, [engine.submit(r) for r in requests]

        _, undisturbed_streams = submit_long()
        undisturbed = [collect(s)[1].token_ids for s in undisturbed_streams]

        long_requests, long_streams = submit_long()
        leads = [iter(s) for s in long_streams]
        for lead in leads:
            assert isinstance(next(lead), TokenEvent)
        assert engine.stats().running == 8
        joiner = greedy_request(engine.encode(PROMPTS[1]), 4, NAMES[2])
        joined = collect(engine.submit(joiner))[1]
        long_results = [next(e for e in lead if isinstance(e, FinishEvent)) for lead in leads]

    long_first = max(first_token_at(r, f) for r, f in zip(long_requests, long_results))
    long_done = min(finished_at(r, f) for r, f in zip(long_requests, long_results))
    assert long_first < first_token_at(joiner, joined) < finished_at(joiner, joined) < long_done
    assert joined.finish_reason == "length" and len(joined.token_ids) == 4
    assert [f.token_ids for f in long_results] == undisturbed


def test_adapter_without_a_slot_waits_while_others_proceed(base_dirs, adapter_dirs) -> None:
    """max_loras=1: requests for A and B submitted together all finish with their own tokens.
    B waits until no running request holds A's slot, while base requests go ahead."""
    adapters = adapter_dirs(ARCH)
    a, b = "all-r16", "att-r4"
    with running_engine(base_dirs[ARCH], "nf4", {a: adapters[a], b: adapters[b]}, max_loras=1,
                        max_cpu_loras=2) as engine:
        specs = [(a, PROMPTS[0], 24), (b, PROMPTS[1], 12), (a, PROMPTS[2], 20), (b, PROMPTS[3], 12),
                 (None, PROMPTS[4], 12)]
        requests = [greedy_request(engine.encode(p), n, name) for name, p, n in specs]
        streams = [engine.submit(r) for r in requests]
        results = [collect(s)[1] for s in streams]
        stats = engine.stats()
        alone = [collect(engine.submit(greedy_request(r.prompt_token_ids, r.sampling.max_new_tokens, r.adapter)))[1]
                 for r in requests]

    assert [f.token_ids for f in results] == [f.token_ids for f in alone]
    assert all(f.finish_reason == "length" for f in results)
    timed = [(name, first_token_at(r, f), finished_at(r, f)) for (name, _, _), r, f in zip(specs, requests, results)]
    a_done = max(done for name, _, done in timed if name == a)
    b_start = min(start for name, start, _ in timed if name == b)
    base_done = next(done for name, _, done in timed if name is None)
    assert a_done < b_start, "B got A's only slot while A was in use"
    assert base_done < b_start, "a base request waited for B's slot"
    assert stats.slot_evictions_total >= 1 and stats.slot_loads_total >= 2
    assert stats.slots_resident == [b]


def test_starvation_guard_lets_a_waiting_adapter_in(base_dirs, adapter_dirs) -> None:
    """max_loras=1 and a steady stream of A requests: once B has waited max_slot_wait_steps,
    newer A requests stop overtaking it, so B runs before them."""
    adapters = adapter_dirs(ARCH)
    a, b = "all-r16", "att-r4"
    with running_engine(base_dirs[ARCH], "nf4", {a: adapters[a], b: adapters[b]}, max_loras=1,
                        max_slot_wait_steps=8) as engine:
        first_a = engine.submit(greedy_request(engine.encode(PROMPTS[0]), 40, a))
        lead = iter(first_a)
        assert isinstance(next(lead), TokenEvent)
        b_request = greedy_request(engine.encode(PROMPTS[1]), 4, b)
        b_stream = engine.submit(b_request)
        for _ in range(16):  # B has now been blocked for more than max_slot_wait_steps steps
            assert isinstance(next(lead), TokenEvent)
        late_a = greedy_request(engine.encode(PROMPTS[2]), 8, a)
        late_stream = engine.submit(late_a)
        b_result, late_result = collect(b_stream)[1], collect(late_stream)[1]
        next(e for e in lead if isinstance(e, FinishEvent))

    assert first_token_at(b_request, b_result) < first_token_at(late_a, late_result)
    assert b_result.finish_reason == late_result.finish_reason == "length"


def _workload() -> list[tuple[str | None, str, int]]:
    """(adapter, prompt, new tokens): a long request for the adapter about to be removed, then
    24 requests over eight adapters and the base, then three for adapters added under load."""
    items = [(NAMES[0], PROMPTS[0], 40)]
    for i in range(24):
        adapter = None if i % 6 == 5 else NAMES[i % 8]
        items.append((adapter, PROMPTS[(i * 3) % len(PROMPTS)], 10 + (i * 7) % 15))
    return items + [(NAMES[8], PROMPTS[0], 16), (NAMES[0], PROMPTS[5], 16), (NAMES[8], PROMPTS[6], 12)]


def test_removal_and_eviction_under_load_keep_outputs_exact(base_dirs, adapter_dirs) -> None:
    """Two slots, a three-adapter host cache, eight adapters in use; while requests run, two
    adapters are removed and others added (one re-added under a removed name). Every request
    that completes has the tokens of a churn-free run; requests for a removed adapter are
    refused at once; the running ones finish normally."""
    adapters = adapter_dirs(ARCH)
    limits = {"max_loras": 2, "max_cpu_loras": 3}
    work = _workload()
    with running_engine(base_dirs[ARCH], "nf4", adapters, **limits) as engine:
        ids = {p: engine.encode(p) for p in PROMPTS}
        streams = [engine.submit(greedy_request(ids[p], n, a)) for a, p, n in work]
        expected = [collect(s)[1].token_ids for s in streams]

    victim, second = NAMES[0], NAMES[1]
    removed: set[str] = set()
    refused = []
    with running_engine(base_dirs[ARCH], "nf4", {n: adapters[n] for n in NAMES[:8]}, **limits) as engine:
        streams = {}

        def submit(first: int, last: int) -> None:
            for i in range(first, last):
                adapter, prompt, n = work[i]
                if adapter in removed:  # refused at once, never queued
                    with pytest.raises(AdapterNotFound) as error:
                        engine.submit(greedy_request(ids[prompt], n, adapter))
                    assert error.value.code == "NOT_FOUND"
                    refused.append(i)
                else:
                    streams[i] = engine.submit(greedy_request(ids[prompt], n, adapter))

        submit(0, 13)
        lead = iter(streams.pop(0))
        assert isinstance(next(lead), TokenEvent)  # the victim's long request is running
        engine.remove_adapter(victim)
        removed.add(victim)
        assert victim not in [e.adapter_id for e in engine.adapters()]
        with pytest.raises(AdapterNotFound):
            engine.adapter_tier(victim)
        submit(13, 19)
        engine.remove_adapter(second)
        removed.add(second)
        submit(19, 25)
        engine.add_adapter(NAMES[8], adapters[NAMES[8]])
        engine.add_adapter(victim, adapters[victim])  # the same name again: a new version
        removed.discard(victim)
        submit(25, len(work))

        outcomes = {}
        for i, stream in streams.items():
            try:
                outcomes[i] = collect(stream)[1]
            except AdapterNotFound as exc:
                outcomes[i] = exc
        victim_result = next(e for e in lead if isinstance(e, FinishEvent))
        stats = engine.stats()

    # The running request finished normally, on the removed adapter's weights.
    assert victim_result.finish_reason == "length"
    assert victim_result.token_ids == expected[0]
    assert refused and all(work[i][0] in (victim, second) for i in refused)
    for i, outcome in outcomes.items():
        adapter = work[i][0]
        if isinstance(outcome, AdapterNotFound):
            # Only a request still queued when its adapter was removed may end this way.
            assert adapter in (victim, second) and i < 25, f"request {i} ({adapter}) failed: {outcome}"
        else:
            assert outcome.finish_reason == "length"
            assert outcome.token_ids == expected[i], f"request {i} ({adapter}) differs from the churn-free run"
    assert all(isinstance(outcomes[i], FinishEvent) for i in range(25, len(work)))
    assert sum(isinstance(o, FinishEvent) for o in outcomes.values()) >= len(outcomes) - 4
    assert stats.slot_evictions_total > 0 and stats.host_evictions_total > 0
    # Registration reads each adapter from disk into the host tier (8 at start, 2 added later);
    # beyond that, waiting adapters' weights were not evicted by each other's loads (that
    # thrash once re-read the same files 160 times for 27 requests).
    registrations = 8 + 2
    assert registrations + len(NAMES) // 2 <= stats.disk_loads_total < registrations + 2 * len(NAMES)
