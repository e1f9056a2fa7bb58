"""The engine thread: continuous batching over many adapters.

Each iteration: apply messages from other threads (new requests, loaded adapters, admin
calls), drop cancelled and expired sequences, admit waiting requests (prefill, first token)
while the batch, the adapter slots and the prefill budget allow, then run one decode step for
the whole batch. A request joins at any step and leaves the step it finishes, releasing its
KV rows and its slot hold at once. Only this thread touches the model, the slots and the host
cache, so none of them needs a lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from loraserve.config import EngineConfig
from loraserve.engine.request import ErrorEvent
from loraserve.engine.runner import ModelRunner
from loraserve.engine.sampling import sample_batch
from loraserve.engine.sequence import Sequence
from loraserve.errors import AdapterIncompatible, AdapterNotFound, Cancelled, DeadlineExceeded, LoraserveError
from loraserve.lora.adapter import LoraWeights
from loraserve.lora.slots import AdapterSlots, HostCache

log = logging.getLogger(__name__)

WeightsLoader = Callable[[str], LoraWeights]
"""Reads and decodes the adapter version `version` from the store (runs on a loader thread)."""


@dataclass
class TierCounters:
    """Where adapter lookups were served from, and loads between tiers."""

    gpu_hits: int = 0
    cpu_hits: int = 0
    disk_loads: int = 0
    disk_load_seconds: float = 0.0


class BatchScheduler:
    """Owns the engine thread. Other threads talk to it only through `post` and `call`."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, slots: AdapterSlots,
                 loader: WeightsLoader, eos_ids: set[int], vocab_size: int) -> None:
        self.config = config
        self.runner = runner
        self.slots = slots
        self.host = HostCache(config.max_cpu_loras)
        self.tiers = TierCounters()
        self._loader = loader
        self._eos_ids = eos_ids
        self._vocab_size = vocab_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()
        # Requests accepted but not yet in the batch, counted from the moment `post` returns
        # (the inbox included), so the queue bound holds under a burst of submissions.
        self._queued = 0
        self._queued_lock = threading.Lock()
        self.idle = threading.Event()  # set while nothing is queued or running
        self.idle.set()
        self._running: list[Sequence] = []
        self._loading: set[str] = set()
        self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self._steps = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.last_batch_size = 0
        self.progress_at = time.monotonic()
        """When the engine thread last went round its loop (a step, a message, or an idle wake):
        read by the heartbeat, so a step that never ends shows as no progress."""
        self.idle_wait_s = 0.5
        self.load_observers: list[Callable[[float], None]] = []
        """Called (on the engine thread) with the seconds each disk load took."""

    # ---- used from other threads -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def post(self, sequence: Sequence, max_queue: int) -> bool:
        """Queue a sequence unless `max_queue` are already waiting; False when full."""
        with self._queued_lock:
            if self._queued >= max_queue:
                return False
            self._queued += 1
            self.idle.clear()
        self._inbox.put(("submit", sequence))
        return True

    def _unqueue(self, seq: Sequence) -> None:
        self._waiting.remove(seq)
        with self._queued_lock:
            self._queued -= 1

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps; the future carries its result."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def wake(self) -> None:
        self._inbox.put(("wake", None))

    def shutdown(self) -> None:
        """Fail everything still queued or running and end the thread."""
        self._inbox.put(("stop", None))
        self._thread.join()
        self._load_pool.shutdown(wait=True)

    @property
    def num_waiting(self) -> int:
        return self._queued

    @property
    def num_running(self) -> int:
        return len(self._running)

    def running_adapters(self) -> list[str]:
        return sorted({s.request.adapter for s in list(self._running) if s.request.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({s.request.adapter for s in list(self._waiting) if s.request.adapter})

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self.progress_at = time.monotonic()
            idle = not self._running and not self._ready_to_admit()
            self._drain_inbox(block=idle)
            if self._stop:
                break
            try:
                self._drop_finished_early()
                self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # a server fault: fail every request, keep the thread alive
                log.exception("engine step failed; failing %d running requests", len(self._running))
                self._fail_running(LoraserveError(f"internal engine error ({type(exc).__name__})"))
            if not self._running and self.num_waiting == 0:
                self.idle.set()
        self._fail_all(Cancelled("the engine shut down before the request finished"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload) -> None:
        if kind == "submit":
            self._waiting.append(payload)
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, who re-raises it
                    future.set_exception(exc)
        elif kind == "loaded":
            version, weights, error, seconds = payload
            self._loading.discard(version)
            if error is not None:
                self._fail_waiting(lambda s: s.adapter_version == version, error)
            else:
                self.tiers.disk_loads += 1
                self.tiers.disk_load_seconds += seconds
                for observe in self.load_observers:
                    observe(seconds)
                self.host.put(version, weights, keep=self.slots.pinned() | self._waiting_keys())
        elif kind == "stop":
            self._stop = True

    def _waiting_keys(self) -> set[str]:
        return {s.adapter_version for s in self._waiting if s.adapter_version is not None}

    def _ready_to_admit(self) -> bool:
        return any(s.adapter_version is None or self.host.get(s.adapter_version) is not None
                   or self.slots.slot_of(s.adapter_version) is not None for s in self._waiting)

    def _drop_finished_early(self) -> None:
        """Cancelled or expired sequences leave before this step runs."""
        now = time.monotonic()
        for seq in list(self._waiting):
            error = _early_end(seq, now)
            if error is not None:
                self._unqueue(seq)
                seq.stream.push(ErrorEvent(error))
        ended = [(i, _early_end(s, now)) for i, s in enumerate(self._running)]
        ended = [(i, e) for i, e in ended if e is not None]
        if ended:
            gone = {i for i, _ in ended}
            for i, error in ended:
                seq = self._running[i]
                if isinstance(error, Cancelled):
                    seq.finish("cancelled")
                else:
                    seq.stream.push(ErrorEvent(error))
            self._remove_rows(gone)

    def _admit(self) -> None:
        """Move waiting requests into the batch (one padded prefill for all of them) while the
        batch, the slots and the prefill budget allow; oldest first, skipping those whose
        adapter is still loading or cannot get a slot."""
        joining: list[Sequence] = []
        longest = 0
        guard = self._starving()
        for seq in list(self._waiting):
            if len(self._running) + len(joining) >= self.config.max_batch_size:
                break
            if guard is not None and seq is not guard and seq.adapter_version is not None:
                continue  # base-only requests take no slot, so they may still pass
            if not self._adapter_ready(seq):
                continue
            prompt_len = len(seq.request.prompt_token_ids)
            # Padded prefill cost: every joining prompt is padded to the longest.
            if joining and max(longest, prompt_len) * (len(joining) + 1) > self.config.max_prefill_tokens:
                break  # the rest join at the next step; running sequences must not stall longer
            longest = max(longest, prompt_len)
            self._unqueue(seq)
            version = seq.adapter_version
            seq.slot = self.slots.acquire(version, self.host.get(version)) if version is not None else 0
            seq.admitted_at = time.monotonic()
            joining.append(seq)
        if joining:
            self._prefill(joining)

    def _adapter_ready(self, seq: Sequence) -> bool:
        """True when the sequence's adapter is in a slot or can be put in one now; otherwise
        starts loading it from disk or notes that the sequence is waiting for a slot."""
        version = seq.adapter_version
        if version is None:
            return True
        if self.slots.slot_of(version) is not None:
            self.tiers.gpu_hits += 1
            return True
        if self.host.get(version) is None:
            # Read from disk only when the weights could be used soon or fit without evicting
            # another waiting adapter's; otherwise loads would evict each other while every
            # slot is busy and the loader would re-read the same files over and over.
            if self.slots.has_room_for(version) or len(self.host) < self.host.capacity:
                self._start_load(version)
            return False
        if not self.slots.has_room_for(version):
            if seq.blocked_since_step is None:
                seq.blocked_since_step = self._steps
            return False
        self.tiers.cpu_hits += 1
        return True

    def _prefill(self, joining: list[Sequence]) -> None:
        prompts = [s.request.prompt_token_ids for s in joining]
        try:
            logits = self.runner.prefill(prompts, [s.slot for s in joining])  # [n, V]
        except Exception:  # e.g. out of memory on long prompts: only these requests fail
            log.exception("prefill failed for %d requests", len(joining))
            for seq in joining:
                if seq.adapter_version is not None:
                    self.slots.release(seq.adapter_version)
                seq.stream.push(ErrorEvent(LoraserveError("internal engine error during prefill")))
            return  # the batch's cache is untouched: prefill adds rows only on success
        first_row = len(self._running)
        self._running.extend(joining)
        for seq, prompt in zip(joining, prompts):
            if seq.request.sampling.repetition_penalty != 1.0:
                seq.seen = torch.zeros(self._vocab_size, dtype=torch.bool, device=logits.device)
                seq.seen[torch.tensor(prompt, device=logits.device)] = True
        self._sample_and_emit(joining, logits, first_row)

    def _starving(self) -> Sequence | None:
        """The oldest request kept from a slot for too long, once newer ones must wait for it."""
        for seq in self._waiting:
            if seq.blocked_since_step is not None and \
                    self._steps - seq.blocked_since_step >= self.config.max_slot_wait_steps:
                return seq
        return None

    def _step(self) -> None:
        running = self._running
        self.last_batch_size = len(running)
        logits = self.runner.decode([s.last_token for s in running], [s.slot for s in running])
        self._steps += 1
        self._sample_and_emit(running, logits, 0)

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor, first_row: int) -> None:
        """Choose each sequence's next token (`seqs` are batch rows first_row...), stream it,
        and remove the sequences that finished."""
        seen = None
        if any(s.seen is not None for s in seqs):
            seen = [s.seen if s.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool) for s in seqs]
        tokens = sample_batch(logits, [s.request.sampling for s in seqs], [s.generator for s in seqs], seen)
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # [n]: a row's own numbers went bad
        done = set()
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if not finite[i]:  # that row alone ends; its batch mates go on
                seq.stream.push(ErrorEvent(_non_finite(seq)))
                done.add(first_row + i)
                continue
            reason = seq.append(token, self._eos_ids)
            if reason is not None:
                seq.finish(reason)
                done.add(first_row + i)
        if done:
            self._remove_rows(done)

    def _remove_rows(self, rows: set[int]) -> None:
        for i in rows:
            seq = self._running[i]
            if seq.adapter_version is not None:
                self.slots.release(seq.adapter_version)
        keep = [i for i in range(len(self._running)) if i not in rows]
        self._running = [self._running[i] for i in keep]
        self.runner.keep_rows(keep)

    def _start_load(self, version: str) -> None:
        if version in self._loading:
            return
        self._loading.add(version)

        def work() -> None:
            started = time.monotonic()
            try:
                weights, error = self._loader(version), None
            except LoraserveError as exc:
                weights, error = None, exc
            except Exception as exc:  # a server fault while reading: log it, fail those requests
                log.exception("loading adapter %s failed", version)
                weights, error = None, LoraserveError(f"could not load the adapter ({type(exc).__name__})")
            self._inbox.put(("loaded", (version, weights, error, time.monotonic() - started)))

        self._load_pool.submit(work)

    def _fail_waiting(self, match: Callable[[Sequence], bool], error: LoraserveError) -> None:
        for seq in [s for s in self._waiting if match(s)]:
            self._unqueue(seq)
            seq.stream.push(ErrorEvent(error))

    def fail_waiting_for(self, version: str, message: str) -> None:
        """Engine thread only: queued requests for a removed adapter version end NOT_FOUND."""
        self._fail_waiting(lambda s: s.adapter_version == version, AdapterNotFound(message))

    def _fail_running(self, error: LoraserveError) -> None:
        for seq in self._running:
            seq.stream.push(ErrorEvent(error))
        self._remove_rows(set(range(len(self._running))))

    def _fail_all(self, error: LoraserveError) -> None:
        self._fail_running(error)
        self._fail_waiting(lambda s: True, error)
        while True:  # requests posted after the stop message
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                payload.stream.push(ErrorEvent(error))
            elif kind == "call":
                payload[1].set_exception(error)


def _early_end(seq: Sequence, now: float) -> LoraserveError | None:
    if seq.stream.cancelled.is_set():
        return Cancelled("the request was cancelled")
    deadline = seq.request.deadline
    if deadline is not None and now > deadline:
        return DeadlineExceeded("the request's deadline passed before it finished")
    return None


def _non_finite(seq: Sequence) -> LoraserveError:
    """The error of a request whose logits came out NaN or infinite (an adapter whose weights
    overflow the compute dtype on this input, or a fault of the base)."""
    if seq.request.adapter:
        return AdapterIncompatible(f"adapter {seq.request.adapter!r} produced non-finite logits (NaN or inf) for "
                                   "this request: its weights overflow the server's compute dtype on this input")
    log.error("the base produced non-finite logits for request %s", seq.request.request_id)
    return LoraserveError("the base model produced non-finite logits for this request")
