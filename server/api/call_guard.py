"""What every RPC passes before its servicer runs: a bound on calls in flight, a bound on the
request's size for its service, and decoding of the request bytes inside the call.

gRPC decodes a request with the method's deserializer before any handler runs, and a failure
there reaches the client as UNKNOWN with a Python exception name in it. This interceptor gives
every method a pass-through deserializer instead and decodes in the handler, so undecodable
bytes (invalid UTF-8 in a string field, a truncated or random payload) are INVALID_ARGUMENT with
the field named, on every service, health and reflection included. Large requests are decoded on
a worker thread, so a big payload never holds the event loop.

Calls beyond `max_in_flight` are RESOURCE_EXHAUSTED at once, counted and logged as refusals.
Health checks are never refused for load: a probe must see the server's real state.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from loraserve.api.wire_errors import describe_undecodable
from loraserve.errors import InvalidArgument

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
DECODE_ON_THREAD_BYTES = 64 * 1024
"""Requests larger than this are decoded on a worker thread (a 2.9 MB request of 200,000 chat
messages took ~0.1 s to parse, every other call waiting meanwhile)."""
LARGE_MESSAGE_BYTES = 1024 * 1024
"""A message this large sets `large_message_seen`, so the server gives its memory back soon after."""
DEFAULT_REQUEST_BYTES = 64 * 1024
"""Request size accepted by a service with no limit of its own (health, reflection, server info:
their requests are a few bytes)."""


class MalformedRequest(InvalidArgument):
    """Request bytes that do not decode as the method's message."""


class CallGuard(grpc.aio.ServerInterceptor):
    """Bounds and decodes every call; one per server."""

    def __init__(self, max_in_flight: int, request_bytes: dict[str, int],
                 on_refused: Callable[[str, str, str], None]) -> None:
        """`request_bytes`: service name -> largest request (one message of a stream) it accepts;
        `on_refused(method, code, message)`: called for every call refused here."""
        self.max_in_flight = max_in_flight
        self.request_bytes = dict(request_bytes)
        self._on_refused = on_refused
        self.in_flight = 0
        self.large_message_seen = False
        """Set when a message over LARGE_MESSAGE_BYTES arrived; the server clears it when it trims."""
        self._wrapped: dict[str, tuple[object, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    def limit_for(self, method: str) -> int:
        service = method.strip("/").split("/")[0]
        return self.request_bytes.get(service, DEFAULT_REQUEST_BYTES)

    # ---- wrapping ------------------------------------------------------------------------
    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer
        exempt = method.startswith(f"/{HEALTH_SERVICE}/")
        if handler.request_streaming:
            behavior = handler.stream_unary or handler.stream_stream

            async def prepare(raw_iterator, context):
                return self._decoded_stream(method, raw_iterator, deserialize), None
        else:
            behavior = handler.unary_unary or handler.unary_stream

            async def prepare(raw, context):
                """(the request, None) or (None, why it cannot be decoded): returned, not raised,
                so no traceback keeps the raw bytes alive until the garbage collector runs."""
                try:
                    return await self._decode(method, raw, deserialize), None
                except MalformedRequest as exc:
                    return None, exc.message
        streaming_response = handler.response_streaming
        if streaming_response and inspect.isasyncgenfunction(behavior):
            async def run_stream(request, context):
                if not await self._enter(method, context, exempt):
                    return
                try:
                    decoded, problem = await prepare(request, context)
                    request = None  # this frame may end up in an abort's traceback: not with the bytes
                    if problem is not None:
                        await self._refuse(method, context, grpc.StatusCode.INVALID_ARGUMENT, problem)
                    async for response in behavior(decoded, context):
                        yield response
                except MalformedRequest as exc:  # met inside a streamed request
                    await self._refuse(method, context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
                finally:
                    self.in_flight -= 1
            new_behavior = run_stream
        else:
            async def run(request, context):
                if not await self._enter(method, context, exempt):
                    return None
                try:
                    decoded, problem = await prepare(request, context)
                    request = None
                    if problem is not None:
                        await self._refuse(method, context, grpc.StatusCode.INVALID_ARGUMENT, problem)
                    return await behavior(decoded, context)
                except MalformedRequest as exc:
                    await self._refuse(method, context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
                finally:
                    self.in_flight -= 1
            new_behavior = run
        kind = ("stream_" if handler.request_streaming else "unary_") + ("stream" if streaming_response else "unary")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(new_behavior, request_deserializer=None, response_serializer=handler.response_serializer)

    async def _enter(self, method: str, context, exempt: bool) -> bool:
        """Take a place in flight; False (and the call refused) when none is left."""
        if not exempt and self.in_flight >= self.max_in_flight:
            await self._refuse(method, context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the server has {self.in_flight:,} calls in flight, its limit (max_concurrent_rpcs); "
                               "retry with backoff or on another replica")
            return False
        self.in_flight += 1
        return True

    async def _refuse(self, method: str, context, code: grpc.StatusCode, message: str) -> None:
        self._on_refused(method, code.name, message)
        await context.abort(code, message)

    # ---- decoding ------------------------------------------------------------------------
    async def _decode(self, method: str, raw: bytes, deserialize):
        if len(raw) > LARGE_MESSAGE_BYTES:
            self.large_message_seen = True
        limit = self.limit_for(method)
        if len(raw) > limit:
            raise MalformedRequest(f"the request is {len(raw):,} bytes, over the {limit:,} bytes this call accepts")
        if deserialize is None:
            return raw
        try:
            if len(raw) > DECODE_ON_THREAD_BYTES:
                return await asyncio.to_thread(deserialize, raw)
            return deserialize(raw)
        except Exception:  # protobuf's DecodeError, or whatever a foreign deserializer raises
            raise MalformedRequest(_explain(deserialize, raw)) from None

    async def _decoded_stream(self, method: str, raw_iterator, deserialize) -> AsyncIterator:
        async for raw in raw_iterator:
            yield await self._decode(method, raw, deserialize)


def _explain(deserialize, raw: bytes) -> str:
    message_class = getattr(deserialize, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    if descriptor is None:
        return "the request bytes could not be decoded"
    return describe_undecodable(descriptor, raw)
