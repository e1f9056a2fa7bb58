"""How other threads talk to the engine thread: one queue of messages, and the count of
requests accepted but not yet in the batch (the queue bound).

Messages are (kind, payload): ("submit", Sequence), ("call", (fn, Future)), ("loaded", ...)
from the adapter loader, ("wake", None) and ("stop", None). Only the engine thread takes them.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterator


class Inbox:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Requests accepted but not yet in the batch, counted from the moment `post` returns
        # (the queue included), so the bound holds under a burst of submissions.
        self._queued = 0
        self._lock = threading.Lock()
        self.idle = threading.Event()
        """Set while nothing is queued or running (the engine thread sets it)."""
        self.idle.set()

    # ---- any thread ------------------------------------------------------------------
    def post(self, sequence: object, max_queue: int) -> bool:
        """Queue a request unless `max_queue` are already waiting; False when full."""
        with self._lock:
            if self._queued >= max_queue:
                return False
            self._queued += 1
            self.idle.clear()
        self._queue.put(("submit", sequence))
        return True

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps; the future carries its result."""
        future: Future = Future()
        self._queue.put(("call", (fn, future)))
        return future

    def put(self, kind: str, payload: object = None) -> None:
        self._queue.put((kind, payload))

    @property
    def queued(self) -> int:
        return self._queued

    # ---- the engine thread -----------------------------------------------------------
    def unqueued(self) -> None:
        """A queued request left the queue (into the batch, or ended)."""
        with self._lock:
            self._queued -= 1

    def take(self, block: bool, timeout: float) -> Iterator[tuple[str, object]]:
        """Every message now in the queue; when `block`, first wait up to `timeout` for one."""
        try:
            message = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            yield message
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return
