"""A request while the engine works on it: its place in the batch, its output so far."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.request import FinishEvent, GenerationRequest, RequestStream, Timings, TokenEvent


@dataclass
class Sequence:
    request: GenerationRequest
    stream: RequestStream
    adapter_version: str | None
    """Which loaded version of the adapter this request runs on (None = base)."""
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    slot: int = 0
    output_ids: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # [V] bool, only with a repetition penalty
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    blocked_since_step: int | None = None
    """First decode step at which it could not get an adapter slot (starvation guard)."""
    prefilled: int = 0
    """Prompt tokens already in its KV (a long prompt is prefilled in chunks over several steps)."""
    prefill_cache: object | None = None
    """Its own KV while its prompt is prefilled in chunks; it joins the batch's when complete."""

    @classmethod
    def create(cls, request: GenerationRequest, stream: RequestStream, adapter_version: str | None,
               detokenizer: IncrementalDetokenizer) -> Sequence:
        seed = request.sampling.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        return cls(request, stream, adapter_version, detokenizer, generator)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def append(self, token_id: int, eos_ids: set[int]) -> str | None:
        """Record one generated token, stream it, and return a finish reason or None."""
        now = time.monotonic()
        if not self.output_ids:
            self.first_token_at = now
        self.output_ids.append(token_id)
        if self.seen is not None:
            self.seen[token_id] = True
        sampling = self.request.sampling
        if token_id in eos_ids and not sampling.ignore_eos:
            self.stream.push(TokenEvent([token_id], ""))
            return "eos"
        delta = self.detokenizer.add(token_id)
        self.stream.push(TokenEvent([token_id], delta))
        if self.detokenizer.stopped:
            return "stop"
        if len(self.output_ids) >= sampling.max_new_tokens:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        """Flush held text and send the summary."""
        tail = self.detokenizer.flush()
        if tail:
            self.stream.push(TokenEvent([], tail))
        if self.detokenizer.stopped and reason in ("length", "eos"):
            reason = "stop"  # the last token completed a stop sequence inside a held character
        now = time.monotonic()
        arrival = self.request.arrival
        first = self.first_token_at or now
        self.stream.push(FinishEvent(
            finish_reason=reason, text=self.detokenizer.text, token_ids=list(self.output_ids),
            prompt_tokens=len(self.request.prompt_token_ids), completion_tokens=len(self.output_ids),
            adapter=self.request.adapter or None,
            timings=Timings(queue_s=(self.admitted_at or now) - arrival, first_token_s=first - arrival,
                            total_s=now - arrival)))
