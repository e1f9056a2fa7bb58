"""The request log under a flood: the first refusal of a (tenant, status) per window in full,
the rest counted into one summary line; every other status always in full."""

from __future__ import annotations

import json
import logging
import time

from loraserve.api.refusal_log import RefusalLog


def _lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "test.refusals"]


def test_a_flood_of_refusals_becomes_one_line_and_a_summary(caplog):
    caplog.set_level(logging.INFO, logger="test.refusals")
    log = logging.getLogger("test.refusals")
    refusals = RefusalLog(log, window_s=3600)
    decisions = [refusals.should_log("b", "RESOURCE_EXHAUSTED") for _ in range(500)]
    assert decisions[0] and not any(decisions[1:])
    assert refusals.should_log("a", "RESOURCE_EXHAUSTED")  # another tenant has its own first line
    assert refusals.should_log("", "UNAUTHENTICATED") and not refusals.should_log("", "UNAUTHENTICATED")
    assert all(refusals.should_log("b", code) for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND") for _ in range(3))
    refusals.flush()
    summaries = _lines(caplog)
    assert {(s["tenant"], s["status"], s["requests"]) for s in summaries} == {
        ("b", "RESOURCE_EXHAUSTED", 499), ("", "UNAUTHENTICATED", 1)}
    # A new window: the next refusal is logged in full again, and an empty window writes nothing.
    assert refusals.should_log("b", "RESOURCE_EXHAUSTED")
    refusals.flush()
    assert len(_lines(caplog)) == 2


def test_the_window_ends_on_its_own(caplog):
    caplog.set_level(logging.INFO, logger="test.refusals")
    refusals = RefusalLog(logging.getLogger("test.refusals"), window_s=0.2)
    assert refusals.should_log("b", "RESOURCE_EXHAUSTED")
    assert not refusals.should_log("b", "RESOURCE_EXHAUSTED")
    refusals.flush(only_if_due=True)  # the window is not over: nothing yet
    assert _lines(caplog) == []
    time.sleep(0.25)
    assert refusals.should_log("b", "RESOURCE_EXHAUSTED")  # a new window, summed up on the way
    assert [(s["tenant"], s["requests"]) for s in _lines(caplog)] == [("b", 1)]
