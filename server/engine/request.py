"""What a client asks the engine for, and what comes back on its stream."""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from jinja2 import TemplateError

from loraserve.errors import FailedPrecondition, InvalidArgument, LoraserveError
from loraserve.store.layout import check_adapter_ref

DEFAULT_MAX_NEW_TOKENS = 64
"""New tokens of a request that does not say (the proto documents the same default)."""
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
FINISH_REASONS = ("length", "stop", "eos", "cancelled")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = no limit."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (as in transformers)."""
    seed: int | None = None
    """Same request + same seed -> same tokens, whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    ignore_eos: bool = False

    def validate(self, max_new_tokens_limit: int) -> None:
        """Raise InvalidArgument naming the field and value for anything out of range."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens {self.max_new_tokens} is over the server limit {max_new_tokens_limit}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgument(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidArgument("stop sequences must not be empty")
            if len(s) > MAX_STOP_LENGTH:
                raise InvalidArgument(f"stop sequences may be at most {MAX_STOP_LENGTH} characters, got one of {len(s)}")


def validate_request(request: GenerationRequest, config, vocab_size: int, max_context: int | None) -> None:
    """InvalidArgument naming the field for a request no engine should queue (`config`: the
    EngineConfig, for its limits); the same rules whichever engine serves it."""
    request.sampling.validate(config.max_new_tokens_limit)
    ids = request.prompt_token_ids
    if not ids:
        raise InvalidArgument("the input is empty: give a prompt or messages")
    if len(ids) > config.max_input_tokens:
        raise InvalidArgument(f"the prompt has {len(ids)} tokens, over max_input_tokens {config.max_input_tokens}")
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidArgument(f"prompt token ids must be in [0, {vocab_size})")
    if max_context and len(ids) + request.sampling.max_new_tokens > max_context:
        raise InvalidArgument(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds the "
            f"model's context of {max_context} tokens")
    if request.adapter:
        check_adapter_ref(request.adapter)


def encode_input(tokenizer, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
    """Token ids of a raw prompt (with BOS) or of chat messages through the tokenizer's template.
    A template's refusal (an unsupported role, say) is INVALID_ARGUMENT with its reason; a base
    without a template cannot take messages (FAILED_PRECONDITION)."""
    if messages:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument("each message needs a string role and content")
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition("this base model has no chat template, so it cannot take messages; "
                                     "send a prompt instead")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        except TemplateError as exc:  # raise_exception() in the template, or a template bug
            raise InvalidArgument(f"the chat template refused these messages: {exc.message or exc}") from None
    elif prompt:
        ids = tokenizer(prompt, add_special_tokens=True).input_ids
    else:
        raise InvalidArgument("the input is empty: give a prompt or messages")
    return list(ids)


@dataclass
class GenerationRequest:
    """One generation: already tokenized prompt, optional adapter name, sampling settings."""

    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    """None or "" = the base model alone."""
    request_id: str = ""
    deadline: float | None = None
    """time.monotonic() after which the engine drops the request."""
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request and the text they complete (never a split UTF-8 character)."""

    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Timings:
    queue_s: float
    first_token_s: float
    total_s: float


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a stream: the whole output and why it ended."""

    finish_reason: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None
    timings: Timings


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; the stream raises `error` to its reader."""

    error: LoraserveError


Event = TokenEvent | FinishEvent | ErrorEvent


class RequestStream:
    """Events of one request, pushed by the engine thread, read either synchronously
    (iterate / `result()`) or from an asyncio loop (`async for` / `await aresult()`)."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_id = request_id
        self._loop = loop
        self._sync: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request; it stops within one decode step."""
        self.cancelled.set()

    def push(self, event: Event) -> None:
        """Called by the engine thread."""
        if self._async is None:
            self._sync.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the reader's loop is closed: nobody is listening any more
            self.cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]:
        if self._async is not None:
            raise TypeError("this stream is bound to an asyncio loop; use `async for`")
        while True:
            event = self._sync.get()
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event
            if isinstance(event, FinishEvent):
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        if self._async is None:
            raise TypeError("this stream was not bound to an asyncio loop; iterate it synchronously")
        while True:
            event = await self._async.get()
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self) -> FinishEvent:
        """Block until the request ends and return its summary."""
        for event in self:
            if isinstance(event, FinishEvent):
                return event
        raise AssertionError("stream ended without a finish event")

    async def aresult(self) -> FinishEvent:
        async for event in self:
            if isinstance(event, FinishEvent):
                return event
        raise AssertionError("stream ended without a finish event")


def warm_up(engine) -> None:
    """One short generation through a started engine (its first forward passes, kernels and
    caches), waited for; both engines run it from `start`."""
    ids = engine.tokenizer("warm up", add_special_tokens=True).input_ids
    engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=2))).result()
