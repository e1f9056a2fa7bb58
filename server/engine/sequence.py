"""A request while the engine works on it: its place in the batch, its output so far."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.output import OutputThread
from loraserve.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    RequestStream,
    Timings,
    TokenEvent,
)
from loraserve.errors import AdapterIncompatible, Cancelled, DeadlineExceeded, LoraserveError

if TYPE_CHECKING:  # only a type here: the cache module pulls in transformers
    from loraserve.engine.kv_cache import SequenceKV

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request: GenerationRequest
    stream: RequestStream
    adapter_version: str | None
    """Which loaded version of the adapter this request runs on (None = base)."""
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    output: OutputThread | None = None
    """Where its events are made and pushed (None: on the calling thread, at once)."""
    slot: int = 0
    output_ids: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # [V] bool, only with a repetition penalty
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    blocked_since_step: int | None = None
    """First decode step at which it could not get an adapter slot (starvation guard)."""
    prefilled: int = 0
    """Prompt tokens already in its KV (a long prompt is prefilled in chunks over several steps)."""
    kv: SequenceKV | None = None
    """Its KV region, reserved at admission for `kv_need` tokens."""
    text_stopped: bool = False
    """A stop string ended its text (set where the text is made); its summary is sent."""
    _delivered: list[int] = field(default_factory=list)  # token ids the reader has been sent
    _closed: bool = False  # its summary or error is sent: nothing more reaches the reader

    @classmethod
    def create(cls, request: GenerationRequest, stream: RequestStream, adapter_version: str | None,
               detokenizer: IncrementalDetokenizer, output: OutputThread | None = None) -> Sequence:
        seed = request.sampling.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        return cls(request, stream, adapter_version, detokenizer, generator, output)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def kv_need(self) -> int:
        """The most KV tokens it can take: its prompt and every token it may generate."""
        return len(self.request.prompt_token_ids) + self.request.sampling.max_new_tokens

    def early_end(self, now: float) -> LoraserveError | None:
        """Why it must end before the next step (cancelled, deadline passed), or None."""
        if self.stream.cancelled.is_set():
            return Cancelled("the request was cancelled")
        deadline = self.request.deadline
        if deadline is not None and now > deadline:
            return DeadlineExceeded("the request's deadline passed before it finished")
        return None

    def non_finite_error(self) -> LoraserveError:
        """The error when its logits came out NaN or infinite (an adapter whose weights overflow
        the compute dtype on this input, or a fault of the base)."""
        if self.request.adapter:
            return AdapterIncompatible(f"adapter {self.request.adapter!r} produced non-finite logits (NaN or inf) "
                                       "for this request: its weights overflow the server's compute dtype on this input")
        log.error("the base produced non-finite logits for request %s", self.request.request_id)
        return LoraserveError("the base model produced non-finite logits for this request")

    # ---- on the engine thread -----------------------------------------------------------
    def append(self, token_id: int, eos_ids: set[int]) -> str | None:
        """Record one generated token, have it streamed, and return a finish reason or None
        ("stop" only without an output thread; with one, see `text_stopped`)."""
        now = time.monotonic()
        if not self.output_ids:
            self.first_token_at = now
        self.output_ids.append(token_id)
        if self.seen is not None:
            self.seen[token_id] = True
        sampling = self.request.sampling
        is_eos = token_id in eos_ids and not sampling.ignore_eos
        self._run(lambda: self._token(token_id, is_eos))
        if is_eos:
            return "eos"
        if self.text_stopped:
            return "stop"
        if len(self.output_ids) >= sampling.max_new_tokens:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        """Have held text flushed and the summary sent."""
        now = time.monotonic()
        self._run(lambda: self._finish(reason, now))

    def push(self, event: Event) -> None:
        """Send an event (an error) after everything sent before it."""
        self._run(lambda: self._deliver(event))

    def _run(self, work) -> None:
        if self.output is None:
            work()
        else:
            self.output.submit(work)

    # ---- where the text is made (the output thread, or inline) --------------------------
    def _token(self, token_id: int, is_eos: bool) -> None:
        if self._closed:
            return
        self._delivered.append(token_id)
        if is_eos:
            self.stream.push(TokenEvent([token_id], ""))
            return
        delta = self.detokenizer.add(token_id)
        self.stream.push(TokenEvent([token_id], delta))
        if self.detokenizer.stopped:
            self.text_stopped = True
            self._finish("stop", time.monotonic())

    def _finish(self, reason: str, now: float) -> None:
        if self._closed:
            return
        tail = self.detokenizer.flush()
        if tail:
            self.stream.push(TokenEvent([], tail))
        if self.detokenizer.stopped and reason in ("length", "eos"):
            reason = "stop"  # the last token completed a stop sequence inside a held character
        arrival = self.request.arrival
        first = self.first_token_at or now
        self._deliver(FinishEvent(
            finish_reason=reason, text=self.detokenizer.text, token_ids=list(self._delivered),
            prompt_tokens=len(self.request.prompt_token_ids), completion_tokens=len(self._delivered),
            adapter=self.request.adapter or None,
            timings=Timings(queue_s=(self.admitted_at or now) - arrival, first_token_s=first - arrival,
                            total_s=now - arrival)))

    def _deliver(self, event: Event) -> None:
        if self._closed:
            return
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self._closed = True
        self.stream.push(event)
