"""The engine thread: continuous batching over many adapters.

Each iteration: apply messages from other threads (new requests, loaded adapters, admin
calls), drop cancelled and expired sequences, admit waiting requests while the batch and the
adapter slots allow, prefill within the step's token budget (short prompts whole, in one padded
forward; a long prompt one chunk per step on a KV of its own, joining the batch when it is
complete), then run one decode step for the whole batch. A long prompt is so read between
decode steps: running sequences keep streaming, and a short prompt arriving behind it is
prefilled in the next step, never padded to it. A request joins at any step and leaves the step
it finishes, releasing its KV rows and its slot hold at once. Only this thread touches the
model, the slots and the host cache, so none of them needs a lock. The tokens it chooses go to
the output thread (`loraserve.engine.output`), which makes the text and pushes the events while
this thread runs the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable

import torch

from loraserve.config import EngineConfig
from loraserve.engine.adapter_tiers import AdapterTiers, TierCounters, WeightsLoader, auto_host_bytes
from loraserve.engine.inbox import Inbox
from loraserve.engine.output import OutputThread
from loraserve.engine.prefill import plan_prefill, prefill_budget
from loraserve.engine.prefix_cache import PrefixCache
from loraserve.engine.request import ErrorEvent
from loraserve.engine.runner import ModelRunner
from loraserve.engine.sampling import sample_batch
from loraserve.engine.sequence import Sequence
from loraserve.errors import AdapterNotFound, Cancelled, LoraserveError, ResourceExhausted
from loraserve.lora.slots import AdapterSlots, HostCache

log = logging.getLogger(__name__)

KV_RELEASE_IDLE_S = 5.0
"""Seconds with nothing queued or running before the engine frees the batch's KV buffers (kept
between batches: see `BatchKVCache.release`)."""

@dataclass
class StepTime:
    """Seconds of decode steps so far: in the model's forward (and the KV update), and on the
    host after it (sampling, detokenizing, streaming the tokens, removing finished rows)."""

    forward_s: float = 0.0
    host_s: float = 0.0


class BatchScheduler:
    """Owns the engine thread. Other threads talk to it only through `post` and `call`."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, slots: AdapterSlots,
                 loader: WeightsLoader, eos_ids: set[int], vocab_size: int) -> None:
        self.config = config
        self.runner = runner
        self.slots = slots
        self.adapters = AdapterTiers(slots, HostCache(config.max_cpu_loras, config.host_cache_bytes or auto_host_bytes()),
                                     loader, lambda *done: self._inbox.put("loaded", done))
        self._eos_ids = eos_ids
        self._vocab_size = vocab_size
        self._inbox = Inbox()
        self.idle = self._inbox.idle  # set while nothing is queued or running
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # admitted (slot held), prompt not fully prefilled
        self.prefill_budget = prefill_budget(config.max_prefill_tokens, runner.device)
        self.prefix = PrefixCache(config.prefix_cache_bytes)
        self.kv_token_rows = runner.cache.arena.capacity
        """Tokens the KV cache holds, every sequence's together (each reserves its `kv_need`)."""
        self.step_time = StepTime()
        self.output: OutputThread | None = None
        """Makes and pushes the requests' events (see `loraserve.engine.output`); set by `start`."""
        self._steps = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.last_batch_size = 0
        self.progress_at = time.monotonic()
        """When the engine thread last went round its loop (a step, a message, or an idle wake):
        read by the heartbeat, so a step that never ends shows as no progress."""
        self.idle_wait_s = 0.5
        self.kv_release_idle_s = KV_RELEASE_IDLE_S
        self._idle_since: float | None = None

    # ---- used from other threads -------------------------------------------------------
    def start(self, executor: Executor | None = None) -> None:
        """Run the engine loop on a thread of its own, or on `executor`'s one thread: the thread
        that loaded the model (see `NativeEngine.load`); and the output thread beside it."""
        self.output = OutputThread()
        if executor is None:
            self._thread.start()
        else:
            self._thread = executor.submit(self._loop)

    def post(self, sequence: Sequence, max_queue: int) -> bool:
        """Queue a sequence unless `max_queue` are already waiting; False when full."""
        return self._inbox.post(sequence, max_queue)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps; the future carries its result."""
        return self._inbox.call(fn)

    def wake(self) -> None:
        self._inbox.put("wake")

    def shutdown(self) -> None:
        """Fail everything still queued or running and end the thread."""
        self._inbox.put("stop")
        if isinstance(self._thread, threading.Thread):
            self._thread.join()
        else:
            self._thread.result()
        self.adapters.shutdown()

    @property
    def host(self) -> HostCache:
        return self.adapters.host

    @property
    def tiers(self) -> TierCounters:
        return self.adapters.counters

    @property
    def load_observers(self) -> list[Callable[[float], None]]:
        return self.adapters.load_observers

    @property
    def num_waiting(self) -> int:
        return self._inbox.queued

    @property
    def num_running(self) -> int:
        """Sequences in the batch, those whose prompt is being prefilled included."""
        return len(self._running) + len(self._prefilling)

    def running_adapters(self) -> list[str]:
        return sorted({s.request.adapter for s in [*self._running, *self._prefilling] if s.request.adapter})

    def waiting_adapters(self) -> list[str]:
        return sorted({s.request.adapter for s in list(self._waiting) if s.request.adapter})

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self.progress_at = time.monotonic()
            idle = not self._running and not self._prefilling and not self._ready_to_admit()
            for message in self._inbox.take(block=idle, timeout=self.idle_wait_s):
                self._handle(*message)
            if idle and self._idle_since is not None and \
                    time.monotonic() - self._idle_since >= self.kv_release_idle_s:
                self.runner.cache.release()  # after a while of nothing to do, not on the step path
            if self._stop:
                break
            try:
                self._drop_finished_early()
                self._admit()
                self.adapters.prefetch(self._waiting)
                if self._prefilling and self._prefill_step():
                    self._admit_arrivals()
                if self._running:
                    self._step()
            except Exception as exc:  # a server fault: fail every request, keep the thread alive
                log.exception("engine step failed; failing %d running requests", len(self._running))
                self._fail_running(LoraserveError(f"internal engine error ({type(exc).__name__})"))
            if not self._running and not self._prefilling and self.num_waiting == 0:
                self.idle.set()
                self._idle_since = self._idle_since or time.monotonic()
            else:
                self._idle_since = None
        self._fail_all(Cancelled("the engine shut down before the request finished"))
        if self.output is not None:
            self.output.stop()  # after every event above is pushed

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
            self.adapters.loaded(version, weights, seconds, keep=self.slots.pinned() | self._waiting_keys())
            if error is not None:
                self._fail_waiting(lambda s: s.adapter_version == version, error)
        elif kind == "stop":
            self._stop = True

    def _unqueue(self, seq: Sequence) -> None:
        self._waiting.remove(seq)
        self._inbox.unqueued()

    def _waiting_keys(self) -> set[str]:
        return {s.adapter_version for s in self._waiting if s.adapter_version is not None}

    def _ready_to_admit(self) -> bool:
        return any(self.adapters.is_available(s.adapter_version) for s in self._waiting)

    def _drop_finished_early(self) -> None:
        """Cancelled or expired sequences leave before this step runs."""
        now = time.monotonic()
        for seq in list(self._waiting):
            error = seq.early_end(now)
            if error is not None:
                self._unqueue(seq)
                seq.push(ErrorEvent(error))
        for seq in list(self._prefilling):
            error = seq.early_end(now)
            if error is not None:
                self._end_prefilling(seq, error)
        ended = [(i, s.early_end(now)) for i, s in enumerate(self._running)]
        ended = [(i, e) for i, e in ended if e is not None or self._running[i].text_stopped]
        if ended:
            gone = {i for i, _ in ended}
            for i, error in ended:
                seq = self._running[i]
                if error is None:  # a stop string ended it; its summary is already sent
                    continue
                if isinstance(error, Cancelled):
                    seq.finish("cancelled")
                else:
                    seq.push(ErrorEvent(error))
            self._remove_rows(gone)

    def _admit(self) -> None:
        """Move waiting requests into the batch (their prompts to be prefilled) while the batch
        and the slots allow; oldest first, skipping those whose adapter is still loading or
        cannot get a slot."""
        guard = self._starving()
        for seq in list(self._waiting):
            rows = len(self._running) + len(self._prefilling)
            if rows >= self.config.max_batch_size:
                break
            if not self.runner.cache.can_reserve(seq.kv_need):
                break  # its KV would not fit beside the others' until some sequences end
            if guard is not None and seq is not guard and seq.adapter_version is not None:
                continue  # base-only requests take no slot, so they may still pass
            if not self.adapters.ready(seq, self._steps):
                continue
            version = seq.adapter_version
            try:
                seq.slot = self._acquire(version) if version is not None else 0
            except ResourceExhausted as exc:  # its weights could not be placed: this request alone fails
                self._unqueue(seq)
                seq.push(ErrorEvent(exc))
                continue
            self._unqueue(seq)
            seq.admitted_at = time.monotonic()
            seq.kv = self.runner.reserve(seq.kv_need)  # fits: checked above, nothing taken since
            length, kv = self.prefix.lookup(version, seq.request.prompt_token_ids)
            if kv is not None:  # the rest of the prompt is prefilled after a copy of the cached prefix
                self.runner.load_prefix(seq.kv, kv)
                seq.prefilled = length
            self._prefilling.append(seq)

    def _prefill_step(self, chunks: bool = True) -> bool:
        """Prefill what the plan gives this step (without `chunks`: only whole prompts); returns
        whether a chunk of a long prompt ran."""
        plan = plan_prefill([(len(s.request.prompt_token_ids), s.prefilled) for s in self._prefilling],
                            self.prefill_budget, decoding=bool(self._running))
        whole = [self._prefilling[i] for i in plan.whole]
        todo = [(self._prefilling[i], tokens) for i, tokens in plan.chunks] if chunks else []
        if whole:
            self._prefilling = [s for s in self._prefilling if s not in whole]
            self._prefill_whole(whole)
        for seq, tokens in todo:
            self._prefill_chunk(seq, tokens)
        return bool(todo)

    def _admit_arrivals(self) -> None:
        """After a chunk of a long prompt (it takes a step or two's time): requests that arrived
        meanwhile are admitted and their short prompts prefilled before the decode step, so a
        short request waits for at most the chunk, not the chunk and a decode step."""
        for message in self._inbox.take(block=False, timeout=0):
            self._handle(*message)
        if not self._stop:
            self._admit()
            self._prefill_step(chunks=False)

    def _prefill_whole(self, joining: list[Sequence]) -> None:
        prompts = [s.request.prompt_token_ids for s in joining]
        try:
            logits = self.runner.prefill(prompts, [s.slot for s in joining], [s.kv for s in joining])  # [n, V]
        except Exception:  # e.g. out of memory on long prompts: only these requests fail
            log.exception("prefill failed for %d requests", len(joining))
            for seq in joining:
                self._release(seq)
                self.runner.free(seq.kv)
                seq.push(ErrorEvent(LoraserveError("internal engine error during prefill")))
            return  # the batch is untouched: prefill adds rows only on success
        if self.prefix.enabled:
            for seq in joining:
                prompt = seq.request.prompt_token_ids
                self.prefix.store(seq.adapter_version, prompt, self.runner.prompt_kv(seq.kv, len(prompt)))
        self._joined(joining, logits)

    def _prefill_chunk(self, seq: Sequence, tokens: int) -> None:
        """One chunk of a long prompt on its own KV; the sequence joins the batch after its last."""
        prompt = seq.request.prompt_token_ids
        chunk = prompt[seq.prefilled:seq.prefilled + tokens]
        try:
            logits = self.runner.prefill_chunk(seq.kv, chunk, seq.slot)
        except Exception:  # only this request fails
            log.exception("prefill of a chunk failed for request %s", seq.request.request_id)
            self._end_prefilling(seq, LoraserveError("internal engine error during prefill"))
            return
        seq.prefilled += len(chunk)
        if seq.prefilled < len(prompt):
            return
        self._prefilling.remove(seq)
        self.prefix.store(seq.adapter_version, prompt, self.runner.prompt_kv(seq.kv, len(prompt)))
        self.runner.join(seq.kv)
        self._joined([seq], logits)

    def _joined(self, joining: list[Sequence], logits: torch.Tensor) -> None:
        """Sequences whose prompts are prefilled (their KV rows now the batch's last): their
        first token."""
        first_row = len(self._running)
        self._running.extend(joining)
        for seq in joining:
            if seq.request.sampling.repetition_penalty != 1.0:
                seq.seen = torch.zeros(self._vocab_size, dtype=torch.bool, device=logits.device)
                seq.seen[torch.tensor(seq.request.prompt_token_ids, device=logits.device)] = True
        self._sample_and_emit(joining, logits, first_row)

    def _acquire(self, version: str) -> int:
        try:
            return self.slots.acquire(version, self.host.get(version))
        except ResourceExhausted:
            # An idle engine's kept KV buffers may hold the memory its weights need (routed-expert
            # factors are allocated on load): give them back and try once more.
            if self._running or self._prefilling or not self.runner.cache.release():
                raise
            return self.slots.acquire(version, self.host.get(version))

    def _release(self, seq: Sequence) -> None:
        if seq.adapter_version is not None:
            self.slots.release(seq.adapter_version)

    def _end_prefilling(self, seq: Sequence, error: LoraserveError) -> None:
        """A sequence still prefilling ends (cancelled, expired, failed): slot and KV freed."""
        self._prefilling.remove(seq)
        self.runner.free(seq.kv)
        self._release(seq)
        if isinstance(error, Cancelled):
            seq.finish("cancelled")
        else:
            seq.push(ErrorEvent(error))

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
        started = time.perf_counter()
        logits = self.runner.decode([s.last_token for s in running], [s.slot for s in running])
        forward = time.perf_counter()
        self._steps += 1
        self._sample_and_emit(running, logits, 0)
        self.step_time.forward_s += forward - started
        self.step_time.host_s += time.perf_counter() - forward

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
                seq.push(ErrorEvent(seq.non_finite_error()))
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
            self._release(self._running[i])
        order = self.runner.remove_rows(set(rows))
        self._running = [self._running[i] for i in order]

    def _fail_waiting(self, match: Callable[[Sequence], bool], error: LoraserveError) -> None:
        for seq in [s for s in self._waiting if match(s)]:
            self._unqueue(seq)
            seq.push(ErrorEvent(error))

    def fail_waiting_for(self, version: str, message: str) -> None:
        """Engine thread only: queued requests for a removed adapter version end NOT_FOUND."""
        self._fail_waiting(lambda s: s.adapter_version == version, AdapterNotFound(message))

    def _fail_running(self, error: LoraserveError) -> None:
        for seq in self._prefilling:
            self._release(seq)
            self.runner.free(seq.kv)
            seq.push(ErrorEvent(error))
        self._prefilling = []
        for seq in self._running:
            seq.push(ErrorEvent(error))
        self._remove_rows(set(range(len(self._running))))

    def _fail_all(self, error: LoraserveError) -> None:
        self._fail_running(error)
        self._fail_waiting(lambda s: True, error)
        for kind, payload in self._inbox.take(block=False, timeout=0):  # posted after the stop message
            if kind == "submit":
                payload.push(ErrorEvent(error))
            elif kind == "call":
                payload[1].set_exception(error)

