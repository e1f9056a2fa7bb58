"""Request log lines for refusals that come in floods, summarized.

A client past its tenant's limits, or one retrying without a valid key, can send a thousand calls
a second; one JSON line each would turn the flood into a log flood (disk, log shipping, the front
end's own CPU). The first refusal of a (tenant, status) in each window is logged in full, with
its request id; the rest are counted and written as one summary line when the window ends.
Metrics still count every one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

SUMMARIZED_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAUTHENTICATED"})
"""Statuses a flood produces. Others (a bad argument, a missing adapter) are one client's
mistake worth a line each."""
WINDOW_SECONDS = 10.0


class RefusalLog:
    """Decides which request lines to write; thread-safe. The key of a line is (tenant, status)
    for the request log; any pair of short strings serves (the client-mistake log keys by call)."""

    def __init__(self, log: logging.Logger, window_s: float = WINDOW_SECONDS,
                 summarized: frozenset[str] = SUMMARIZED_CODES, level: int = logging.INFO,
                 key_name: str = "tenant") -> None:
        """`summarized`: statuses written once per window and key, then counted; `level` and
        `key_name` (what the key is called): those of the summary lines."""
        self._log = log
        self._window_s = window_s
        self._summarized = summarized
        self._level = level
        self._key_name = key_name
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._seen: set[tuple[str, str]] = set()  # logged in full in this window
        self._counted: Counter[tuple[str, str]] = Counter()  # counted, not logged, in this window

    def should_log(self, tenant: str, code: str) -> bool:
        """Whether this request's own line is written; False means it was counted instead."""
        if code not in self._summarized:
            return True
        self.flush(only_if_due=True)
        with self._lock:
            if (tenant, code) not in self._seen:
                self._seen.add((tenant, code))
                return True
            self._counted[(tenant, code)] += 1
            return False

    def flush(self, only_if_due: bool = False) -> None:
        """Write the summary of the window and start a new one (with `only_if_due`, only once
        the window is over). Called by the server every window too, so a flood that stops is
        still summed up."""
        now = time.monotonic()
        with self._lock:
            if only_if_due and now - self._started < self._window_s:
                return
            counted, elapsed = self._counted, now - self._started
            self._counted, self._seen, self._started = Counter(), set(), now
        for (tenant, code), n in sorted(counted.items()):
            self._log.log(self._level, json.dumps({"summary": "refused requests not logged one by one",
                                                   self._key_name: tenant, "status": code, "requests": n,
                                                   "seconds": round(elapsed, 1)}))
