"""The output thread: turns the token ids a decode step chose into what a request's reader sees
(text deltas, the finish summary, errors), off the engine thread.

Detokenizing costs two tokenizer decodes per token per row, and pushing an event wakes its
reader (an asyncio loop's `call_soon_threadsafe`, a queue's condition); on the engine thread
both would delay the next step of every row. Here the engine thread only hands each piece of
work over a queue, and this thread runs them in the order handed over, while the engine runs
its next forward (torch's kernels release the GIL). One thread for all requests keeps every
request's events in order: a token's text, then the next token's, then the summary.

What the engine still decides at once: end of sequence and length (no text needed). A stop
string is found here, a step or two after its token was sampled: the sequence is marked
`text_stopped` and its summary sent at once with the tokens up to the stop; the engine drops
its row at its next step and nothing after the stop reaches the reader.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class OutputThread:
    """Runs handed-over callables in order on a thread of its own."""

    def __init__(self, name: str = "engine-output") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        """Run `work` after everything submitted before it (any thread)."""
        self._queue.put(work)

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                work()
            except Exception:  # one request's bad event must not end everyone's output
                log.exception("output thread: an event failed")
