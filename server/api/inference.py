"""InferenceService: translates Generate / GenerateStream to engine requests. Validation and
tokenization happen before queueing; a client that goes away or whose deadline passes has its
request dropped by the engine within one step.

Bounded work before any work: an input too large to fit max_input_tokens is refused from its
size (`loraserve.engine.input_limits`) before it is tokenized, and tokenizing runs on a small pool of
its own, never on the event loop, so a large prompt delays nobody else's call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from loraserve.api.access import AccessControl
from loraserve.api.convert import input_from_proto, sampling_from_proto, summary_to_proto
from loraserve.api.metrics import ServerMetrics
from loraserve.api.refusal_log import RefusalLog
from loraserve.api.status import abort, as_named, status_of
from loraserve.engine.contract import Engine
from loraserve.engine.request import FinishEvent, GenerationRequest, TokenEvent
from loraserve.errors import AdapterNotFound, ResourceExhausted, Unavailable
from loraserve.proto.v1 import inference_pb2 as pb
from loraserve.proto.v1 import inference_pb2_grpc

log = logging.getLogger("loraserve.requests")
TOKENIZER_THREADS = 2
"""Threads tokenizing prompts. A prompt at the size bound (512 KiB for DeepSeek's tokenizers at 4,096
tokens) takes ~0.25 s on one CPU; two let a short prompt pass a long one."""
_CALL = "InferenceService"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, metrics: ServerMetrics, access: AccessControl,
                 on_miss: Callable[[str], bool] | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._access = access
        # Asked (on a worker thread) about an adapter this process does not serve: another
        # replica or a training job may just have published it into the shared store.
        self._on_miss = on_miss
        self.refusals = RefusalLog(log)
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")

    async def _request(self, msg: pb.GenerationInput, context: grpc.aio.ServicerContext,
                       adapter_id: str | None) -> GenerationRequest:
        limits = self._engine.input_limits
        kind = msg.WhichOneof("input")
        if kind == "prompt":
            limits.check_prompt(msg.prompt)
        elif kind == "messages":
            limits.check_messages(msg.messages.messages)
        prompt, messages = input_from_proto(msg)
        ids = await asyncio.get_running_loop().run_in_executor(
            self._tokenizers, functools.partial(self._engine.encode, prompt=prompt, messages=messages))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return GenerationRequest(ids, sampling_from_proto(msg.sampling), adapter_id,
                                 request_id=msg.request_id or uuid.uuid4().hex, deadline=deadline)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        finish, request_id = None, ""
        async for request_id, event in self._run(request.input, context):
            if isinstance(event, FinishEvent):
                finish = event
        return pb.GenerateResponse(summary=self._summary(request_id, finish, request.input.adapter))

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext):
        async for request_id, event in self._run(request.input, context):
            if isinstance(event, TokenEvent):
                if event.text or event.token_ids:
                    yield pb.GenerateStreamResponse(delta=pb.TextDelta(text=event.text, token_ids=event.token_ids))
            else:
                yield pb.GenerateStreamResponse(summary=self._summary(request_id, event, request.input.adapter))

    @staticmethod
    def _summary(request_id: str, finish: FinishEvent, requested: str) -> pb.GenerationSummary:
        summary = summary_to_proto(request_id, finish)
        summary.adapter = requested  # as the client named it, not the internal '<tenant>/<name>' id
        return summary

    async def _run(self, msg: pb.GenerationInput, context: grpc.aio.ServicerContext):
        adapter = msg.adapter
        request_id = msg.request_id
        started = time.monotonic()
        code = "OK"
        finish = None
        stream = None
        caller = ref = None
        admitted = contextlib.ExitStack()
        recorded = False

        def record() -> None:
            """Count the request once, as soon as its outcome is known: before its summary or
            status reaches the client, so a client that reads /metrics right after sees it."""
            nonlocal recorded
            if recorded:
                return
            recorded = True
            # Only registered adapters and the keys file's tenants become label values: the
            # label sets stay bounded whatever clients send.
            label = ref.name if ref and self._engine.has_adapter(ref.adapter_id) else ""
            tenant = caller.tenant if caller else ""
            self._metrics.requests.labels(adapter=label, tenant=tenant, code=code).inc()
            if code == "DATA_LOSS":
                self._metrics.data_loss.labels(adapter=label, tenant=tenant).inc()
            if finish is not None:
                t = finish.timings
                self._metrics.observe_finish(tenant, finish.prompt_tokens, finish.completion_tokens,
                                             t.queue_s, t.first_token_s, t.total_s)

        try:
            if not self._engine.ready:
                raise Unavailable("the server is starting up or draining; retry shortly")
            caller = self._access.caller(context.invocation_metadata(), context.peer(), "generate")
            ref = self._access.for_use(adapter, caller) if adapter else None
            admitted.enter_context(self._access.admit(caller))
            request = await self._request(msg, context, ref.adapter_id if ref else None)
            request_id = request.request_id
            if ref and self._on_miss is not None and not self._engine.has_adapter(ref.adapter_id):
                await asyncio.to_thread(self._on_miss, ref.adapter_id)
            if ref and not self._engine.has_adapter(ref.adapter_id):
                raise AdapterNotFound(f"adapter {ref.requested!r} is not registered")
            stream = self._engine.submit(request, loop=asyncio.get_running_loop())
            last = None
            async for event in stream:
                now = time.monotonic()
                if isinstance(event, TokenEvent) and event.token_ids:
                    if last is not None:
                        self._metrics.itl.observe(now - last)
                    last = now
                if isinstance(event, FinishEvent):
                    finish = event
                    record()
                yield request_id, event
        except asyncio.CancelledError:  # the client went away or the deadline passed
            code = "CANCELLED"
            if stream is not None:
                self._engine.cancel(stream)
            raise
        except Exception as exc:  # mapped to a status in one place; nothing is swallowed
            code = status_of(exc)[0].name
            record()
            if isinstance(exc, ResourceExhausted):  # a tenant's limit: answered when a retry could pass
                exc = await self._access.refuse(exc, context.time_remaining())
            if ref is not None:
                exc = as_named(exc, ref.adapter_id, ref.requested)
            await abort(context, exc, request_id, call=_CALL)
        finally:
            admitted.close()
            if stream is not None and finish is None:
                self._engine.cancel(stream)
            record()
            tenant = caller.tenant if caller else ""
            if self.refusals.should_log(tenant, code):  # never `return` here: it would swallow the abort
                log.info(json.dumps({
                    "request_id": request_id, "adapter": adapter, "tenant": tenant, "status": code,
                    "prompt_tokens": finish.prompt_tokens if finish else None,
                    "completion_tokens": finish.completion_tokens if finish else None,
                    "finish_reason": finish.finish_reason if finish else None,
                    "queue_s": round(finish.timings.queue_s, 4) if finish else None,
                    "first_token_s": round(finish.timings.first_token_s, 4) if finish else None,
                    "total_s": round(time.monotonic() - started, 4)}))
