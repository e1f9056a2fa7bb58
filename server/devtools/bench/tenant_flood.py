"""Tenant B of `loraserve bench tenants`: a separate client process whose threads call Generate
back to back, with no pause and no backoff (a flood), or paced to a rate (B at its limits), and
count what they get back.

A process of its own, as a separate client would be: threads in the bench process would contend
with tenant A's client for its GIL, and A's latency would grow on the client side. Started with
`spawn`, never `fork`: the parent holds grpc channels and threads that a fork would copy broken.
Imports only the client (no torch), so it starts in about a second.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter

CALL_TIMEOUT_S = 120.0  # a hung call becomes an error in the report, never a hung bench


class FloodProcess:
    """Tenant B as a separate client process: `start()` sets its threads calling Generate back
    to back; `stop()` stops them, waits for their calls in flight, and returns what they got."""

    def __init__(self, target: str, api_key: str, threads: int, new_tokens: int, rate: float = 0.0) -> None:
        """`rate` > 0: all threads together start at most `rate` calls per second; 0: no pause."""
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_flood_main, daemon=True,
                                        args=(child, target, api_key, threads, new_tokens, rate))
        self._process.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("the flood process did not start")

    def start(self) -> None:
        self._conn.send("start")

    def stop(self) -> dict:
        self._conn.send("stop")
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("exit")
        self._conn.close()
        self._process.join(10)
        if self._process.is_alive():  # stopped mid-flood by an error: it waits for another command
            self._process.kill()


def _flood_main(conn, target: str, api_key: str, threads: int, new_tokens: int, rate: float) -> None:
    """The flood process: 'start' sets `threads` threads calling, 'stop' stops them and sends back
    their status counts, 'exit' ends the process."""
    from loraserve.client import LoraserveClient

    # One channel for all threads, as one client application would have.
    client = LoraserveClient(target, api_key=api_key, timeout=CALL_TIMEOUT_S)
    _warm_up(client, new_tokens)
    conn.send("ready")
    while conn.recv() == "start":
        stop = threading.Event()
        counts = [Counter() for _ in range(threads)]
        interval = threads / rate if rate > 0 else 0.0  # each thread's start-to-start spacing
        workers = [threading.Thread(target=_hammer, args=(client, stop, c, range(n, 1 << 62, threads), new_tokens,
                                                          interval))
                   for n, c in enumerate(counts)]
        cpu, start = time.process_time(), time.perf_counter()
        for w in workers:
            w.start()
        conn.recv()  # "stop"
        stop.set()
        for w in workers:
            w.join()  # calls in flight finish: the next phase starts on a server B has left
        conn.send({"codes": dict(sum(counts, Counter())), "elapsed_s": time.perf_counter() - start,
                   "cpu_s": time.process_time() - cpu})
    client.close()


def _warm_up(client, new_tokens: int) -> None:
    """One call that gets through: B's rate limit may refuse it at first (another of B's processes
    has just warmed up), so it waits its turn, as a well-behaved client would."""
    from loraserve.client import LoraserveClientError

    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        try:
            client.generate("Tenant B warms up", adapter="bench", max_new_tokens=new_tokens)
            return
        except LoraserveClientError as exc:
            if exc.code != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def _hammer(client, stop: threading.Event, codes: Counter, numbers: range, new_tokens: int,
            interval: float) -> None:
    """Generate calls until `stop`, each at least `interval` s after the previous one started (0:
    back to back, no backoff); counts each status."""
    from loraserve.client import LoraserveClientError

    due = time.monotonic()
    for i in numbers:
        if stop.wait(max(0.0, due - time.monotonic())) if interval else stop.is_set():
            return
        due = time.monotonic() + interval
        try:
            client.generate(f"Tenant B floods the server with request {i}", adapter="bench", max_new_tokens=new_tokens)
            codes["OK"] += 1
        except LoraserveClientError as exc:
            codes[exc.code] += 1
