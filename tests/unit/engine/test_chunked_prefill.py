"""Chunked prefill in the native engine: a long prompt is read in chunks between decode steps, on
a KV of its own, and joins the batch when complete. Its tokens are PEFT's (as the whole-prompt
prefill's), running sequences keep streaming while it is read, and a short prompt sent behind it
is answered first, never padded to it."""

from __future__ import annotations

import threading
import time

import pytest
from model_fixtures import PeftReference, collect, greedy_request, running_engine

from loraserve.engine.prefill import plan_prefill
from loraserve.engine.request import TokenEvent

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

BUDGET = 16
LONG_WORDS = " ".join(f"word{i} about the sea and a red fox" for i in range(24))


# ---- the plan (pure) -------------------------------------------------------------------------
def test_a_long_prompt_alone_takes_the_whole_budget():
    plan = plan_prefill([(100, 0)], 16)
    assert plan.whole == [] and plan.chunks == [(0, 16)]
    assert plan_prefill([(16, 0)], 16).whole == [0]  # fits: one piece
    assert plan_prefill([(100, 96)], 16).chunks == [(0, 4)]  # the last chunk is what is left


def test_short_prompts_go_whole_and_a_long_one_shares_the_step():
    plan = plan_prefill([(100, 30), (5, 0), (6, 0), (40, 0)], 32)
    assert plan.whole == [1, 2] and plan.chunks == [(0, 32 - 2 * 6)]  # the oldest prompt not taken whole
    # Padded to the longest of the group, the group stays within the budget.
    plan = plan_prefill([(10, 0), (10, 0), (10, 0), (10, 0)], 32)
    assert plan.whole == [0, 1, 2] and plan.chunks == [(3, 32 // 4)]  # 2 tokens of room: a quarter of the budget
    # A prompt over half the budget is chunked while others wait, however much room is left.
    plan = plan_prefill([(20, 0), (3, 0)], 32)
    assert plan.whole == [1] and plan.chunks == [(0, 20)]


def test_a_cached_prefix_leaves_a_short_rest_that_does_not_wait_behind_a_long_prompt():
    plan = plan_prefill([(2000, 640), (19, 16)], 64)
    assert plan.whole == [] and plan.chunks == [(1, 3), (0, 61)]


def test_while_sequences_decode_a_long_prompts_chunks_are_half_the_budget():
    assert plan_prefill([(2000, 640)], 64, decoding=True).chunks == [(0, 32)]
    assert plan_prefill([(2000, 640)], 64).chunks == [(0, 64)]  # alone: the whole budget
    plan = plan_prefill([(2000, 640), (5, 0)], 64, decoding=True)  # whole prompts keep their share
    assert plan.whole == [1] and plan.chunks == [(0, 32)]
    assert plan_prefill([(2000, 1990)], 64, decoding=True).chunks == [(0, 10)]


def test_a_long_prompt_always_moves_on():
    plan = plan_prefill([(500, 0), *[(8, 0)] * 8], 32)
    assert plan.chunks[-1][0] == 0 and plan.chunks[-1][1] >= 32 // 4


# ---- the engine ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["deepseek-v3", "deepseek-llm"])
def test_a_chunked_prompt_gives_pefts_tokens(base_dirs, adapter_dirs, arch):
    """Chunks of 16 tokens (MLA and Llama attention, LoRA on every linear), base and adapter."""
    adapters = adapter_dirs(arch)
    name = "all-r16"
    reference = PeftReference(base_dirs[arch], "none")
    with running_engine(base_dirs[arch], "none", {name: adapters[name]}, max_prefill_tokens=BUDGET) as engine:
        ids = engine.encode(LONG_WORDS)
        assert len(ids) > 6 * BUDGET
        for adapter in (None, name):
            _, finish = collect(engine.submit(greedy_request(ids, 12, adapter)))
            assert finish.token_ids == reference.greedy(adapters[name] if adapter else None, ids, 12), adapter


def test_running_streams_keep_streaming_while_a_long_prompt_is_read(base_dirs):
    """Every step carries at most one chunk and one decode step, so a stream that is decoding
    gets a token for (about) every chunk of the long prompt before the long prompt's first."""
    with running_engine(base_dirs["deepseek-llm"], "none", max_prefill_tokens=BUDGET) as engine:
        ids = engine.encode(LONG_WORDS)
        chunks = -(-len(ids) // BUDGET)
        arrivals: list[float] = []
        running = engine.submit(greedy_request(engine.encode("Story about the moon"), chunks + 20))

        def read() -> None:
            for event in running:
                if isinstance(event, TokenEvent) and event.token_ids:
                    arrivals.append(time.monotonic())
        reader = threading.Thread(target=read)
        reader.start()
        while not arrivals:
            time.sleep(0.001)
        long_request = greedy_request(ids, 2)
        submitted = time.monotonic()
        _, finish = collect(engine.submit(long_request))
        long_first = long_request.arrival + finish.timings.first_token_s
        reader.join(60)
        during = sum(submitted <= t <= long_first for t in arrivals)
        assert during >= chunks - 2, (during, chunks)


def test_a_short_prompt_behind_a_long_one_is_answered_first(base_dirs):
    with running_engine(base_dirs["deepseek-llm"], "none", max_prefill_tokens=BUDGET) as engine:
        long_request = greedy_request(engine.encode(LONG_WORDS), 2)
        short_request = greedy_request(engine.encode("Quick question"), 2)
        long_stream = engine.submit(long_request)
        short_stream = engine.submit(short_request)
        _, short = collect(short_stream)
        _, long = collect(long_stream)
        assert short_request.arrival + short.timings.first_token_s < long_request.arrival + long.timings.first_token_s
        assert short.token_ids and long.token_ids
