"""Python clients for a loraserve server: `LoraserveClient` (blocking) and `AsyncLoraserveClient`
(asyncio), with the same methods. Results are plain frozen dataclasses and every failure is a
`LoraserveClientError` carrying the gRPC status name, so callers import neither grpc nor torch.
Those result types live in `loraserve.client_types` and are re-exported here.

    with LoraserveClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", adapter="support-v2", max_new_tokens=32).text)
        for item in client.generate_stream("Hello"):
            print(item.text, end="")  # StreamEvent deltas, then the final Generation

Authentication and TLS are constructor arguments (see loraserve.client_connection.Connection):
`LoraserveClient("host:443", tls_ca="ca.pem")`; the API key comes from LORASERVE_API_KEY unless
`api_key` is given, and goes with every call as `authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client_connection import Connection
from loraserve.client_types import (
    Adapter,
    AdapterFile,
    Generation,
    Limits,
    LoraserveClientError,
    Registration,
    ServerInfo,
    StreamEvent,
    _adapter,
    _client_error,
    _generation,
    _server_info,
    _status,
    _stream_item,
)
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import adapters_pb2_grpc, inference_pb2_grpc, server_info_pb2_grpc
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import server_info_pb2 as spb

__all__ = ["DEFAULT_TARGET", "UPLOAD_FILES", "Adapter", "AdapterFile", "AsyncGenerationStream", "AsyncLoraserveClient",
           "Generation", "GenerationStream", "Limits", "LoraserveClient", "LoraserveClientError", "Registration",
           "ServerInfo", "StreamEvent"]

DEFAULT_TARGET = "127.0.0.1:50051"
# The files an upload carries, in the order they are sent (the server accepts exactly these).
UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _generation_input(prompt: str | None, messages: Sequence[Mapping[str, str]] | None, adapter: str,
                      max_new_tokens: int | None, temperature: float, top_p: float | None, top_k: int,
                      repetition_penalty: float | None, seed: int | None, stop: Sequence[str],
                      request_id: str) -> ipb.GenerationInput:
    if (prompt is None) == (messages is None):
        raise LoraserveClientError("INVALID_ARGUMENT", "give exactly one of prompt and messages")
    if isinstance(stop, str):  # a bare string would be split into single-character stops
        stop = (stop,)
    sampling = ipb.SamplingParams(temperature=temperature, top_k=top_k, stop=list(stop))
    for field, value in (("max_new_tokens", max_new_tokens), ("top_p", top_p),
                         ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:  # unset optional fields get the server's documented defaults
            setattr(sampling, field, value)
    msg = ipb.GenerationInput(adapter=adapter or "", sampling=sampling, request_id=request_id)
    if prompt is not None:
        msg.prompt = prompt
    else:
        turns = [ipb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        msg.messages.CopyFrom(ipb.Messages(messages=turns))
    return msg


MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""Largest upload chunk a loraserve server accepts in one message (its UPLOAD_MESSAGE_BYTES, less framing)."""


def _upload_files(directory: str | Path, chunk_bytes: int) -> list[Path]:
    """The files to upload, checked before the RPC starts so a typo fails without a round trip."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise LoraserveClientError("INVALID_ARGUMENT", f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES:,} (the largest "
                                   f"upload message a server accepts), got {chunk_bytes}")
    paths = [Path(directory) / name for name in UPLOAD_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise LoraserveClientError("INVALID_ARGUMENT", f"{directory} has no {' or '.join(missing)}")
    return paths


def _upload_messages(name: str, paths: list[Path], replace: bool,
                     chunk_bytes: int) -> Iterator[apb.UploadAdapterRequest]:
    """The header, then each file in chunks of at most chunk_bytes (at least one chunk per file,
    so an empty file still reaches the server and is rejected there with its reason)."""
    yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name, replace=replace))
    for path in paths:
        with path.open("rb") as f:
            data = f.read(chunk_bytes)
            while True:
                yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=path.name, data=data))
                data = f.read(chunk_bytes)
                if not data:
                    break


class _Stubs:
    """The service stubs of one channel (sync or asyncio: the generated stubs accept both)."""

    def __init__(self, channel: Any) -> None:
        self.inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
        self.info = server_info_pb2_grpc.ServerInfoServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


class GenerationStream:
    """Iterator over one streamed generation: a StreamEvent per text delta, then the Generation as
    the last item. Leaving early (break, an exception, close(), the `with` block) cancels the RPC,
    so the server stops generating for it."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._done = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> StreamEvent | Generation:
        if self._done:
            raise StopIteration
        try:
            item = _stream_item(next(self._call))
        except StopIteration:
            self._done = True
            raise LoraserveClientError("INTERNAL", "the stream ended without a summary") from None
        except grpc.RpcError as exc:
            self._done = True
            raise _client_error(exc) from None
        self._done = isinstance(item, Generation)
        return item

    def close(self) -> None:
        """Cancel the RPC unless it already finished."""
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # breaking out of a `for` drops the last reference
        self.close()


class AsyncGenerationStream:
    """The asyncio form of GenerationStream (`async for`, `async with`, `aclose()`)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._done = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent | Generation:
        if self._done:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.RpcError as exc:
            self._done = True
            raise _client_error(exc) from None
        if msg is grpc.aio.EOF:
            self._done = True
            raise LoraserveClientError("INTERNAL", "the stream ended without a summary")
        item = _stream_item(msg)
        self._done = isinstance(item, Generation)
        return item

    def cancel(self) -> None:
        """Cancel the RPC unless it already finished (synchronous: safe from __del__)."""
        if not self._done:
            self._done = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:  # an async generator would only be closed later by the loop
        self.cancel()


class _Base:
    def __init__(self, connection: Connection, timeout: float | None, channel: Any) -> None:
        self.target = connection.target
        self.timeout = timeout
        self._connection = connection
        self._metadata = connection.metadata  # sent with every call, streams and uploads included
        self._channel = channel
        self._stubs = _Stubs(channel)

    def _routing(self, adapter: str) -> tuple[tuple[str, str], ...]:
        """The call's metadata; generation calls also carry `adapter: <name>`, so a proxy in
        front of several replicas can hash on it and keep each adapter on one replica's GPU
        slots (e.g. an Envoy ring_hash policy on that header)."""
        return (*self._metadata, ("adapter", adapter)) if adapter else self._metadata

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def __repr__(self) -> str:  # the API key never appears, only whether one is set
        return f"{type(self).__name__}({self._connection!r}, timeout={self.timeout})"


class LoraserveClient(_Base):
    """Blocking client over one channel. `timeout` (seconds) is the default deadline of every
    call (None: no deadline); each method's own `timeout` overrides it. The keyword arguments
    (API key, TLS, mTLS) are those of `loraserve.client_connection.Connection`; a bad combination or
    an unreadable PEM file raises ValueError here, not at the first call."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = None, *, api_key: str | None = None,
                 tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_server_name: str | None = None) -> None:
        connection = Connection(target, api_key=api_key, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                tls_key=tls_key, tls_server_name=tls_server_name)
        super().__init__(connection, timeout, connection.channel())

    def _call(self, method: Any, request: Any, timeout: float | None, adapter: str = "") -> Any:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._routing(adapter))
        except grpc.RpcError as exc:
            raise _client_error(exc) from None

    def generate(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                 adapter: str = "", max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int = 0, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: Sequence[str] = (), request_id: str = "",
                 timeout: float | None = None) -> Generation:
        """Generate on the base (adapter "") or a named adapter; give `prompt` (raw text) or
        `messages` ([{"role", "content"}], formatted with the base's chat template on the server)."""
        msg = _generation_input(prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k,
                                repetition_penalty, seed, stop, request_id)
        return _generation(self._call(self._stubs.inference.Generate, ipb.GenerateRequest(input=msg), timeout,
                                      adapter).summary)

    def generate_stream(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                        adapter: str = "", max_new_tokens: int | None = None, temperature: float = 0.0,
                        top_p: float | None = None, top_k: int = 0, repetition_penalty: float | None = None,
                        seed: int | None = None, stop: Sequence[str] = (), request_id: str = "",
                        timeout: float | None = None) -> GenerationStream:
        """As `generate`, streamed: StreamEvent deltas, then the Generation (see GenerationStream)."""
        msg = _generation_input(prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k,
                                repetition_penalty, seed, stop, request_id)
        call = self._stubs.inference.GenerateStream(ipb.GenerateStreamRequest(input=msg),
                                                    timeout=self._deadline(timeout), metadata=self._routing(adapter))
        return GenerationStream(call)

    def register_adapter(self, name: str, path: str, replace: bool = False,
                         timeout: float | None = None) -> Registration:
        """Register a directory under one of the server's import roots (a path on the server)."""
        r = self._call(self._stubs.adapters.RegisterAdapter,
                       apb.RegisterAdapterRequest(name=name, path=path, replace=replace), timeout)
        return Registration(_status(r.adapter), r.created)

    def upload_adapter(self, name: str, directory: str | Path, replace: bool = False, chunk_bytes: int = 1 << 20,
                       timeout: float | None = None) -> Registration:
        """Send a local PEFT adapter directory's config and weights to the server."""
        messages = _upload_messages(name, _upload_files(directory, chunk_bytes), replace, chunk_bytes)
        r = self._call(self._stubs.adapters.UploadAdapter, messages, timeout)
        return Registration(_status(r.adapter), r.created)

    def validate_adapter(self, name: str, path: str, timeout: float | None = None) -> Adapter:
        """Every check of register on a server-side directory; the manifest it would get."""
        r = self._call(self._stubs.adapters.ValidateAdapter, apb.ValidateAdapterRequest(name=name, path=path), timeout)
        return _adapter(r.manifest)

    def unregister_adapter(self, name: str, timeout: float | None = None) -> None:
        self._call(self._stubs.adapters.UnregisterAdapter, apb.UnregisterAdapterRequest(name=name), timeout)

    def list_adapters(self, timeout: float | None = None) -> list[Adapter]:
        r = self._call(self._stubs.adapters.ListAdapters, apb.ListAdaptersRequest(), timeout)
        return [_status(s) for s in r.adapters]

    def get_adapter(self, name: str, timeout: float | None = None) -> Adapter:
        return _status(self._call(self._stubs.adapters.GetAdapter, apb.GetAdapterRequest(name=name), timeout).adapter)

    def pin_adapter(self, name: str, timeout: float | None = None) -> None:
        self._call(self._stubs.adapters.PinAdapter, apb.PinAdapterRequest(name=name), timeout)

    def unpin_adapter(self, name: str, timeout: float | None = None) -> None:
        self._call(self._stubs.adapters.UnpinAdapter, apb.UnpinAdapterRequest(name=name), timeout)

    def share_adapter(self, name: str, shared: bool = True, timeout: float | None = None) -> Adapter:
        """Let every tenant use the adapter (admin only); `shared=False` takes that back."""
        r = self._call(self._stubs.adapters.ShareAdapter, apb.ShareAdapterRequest(name=name, shared=shared), timeout)
        return _status(r.adapter)

    def server_info(self, timeout: float | None = None) -> ServerInfo:
        return _server_info(self._call(self._stubs.info.GetServerInfo, spb.GetServerInfoRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The standard health status name: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
        r = self._call(self._stubs.health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLoraserveClient(_Base):
    """The asyncio client: the same methods and constructor arguments as LoraserveClient, awaited,
    except `generate_stream`, which returns an AsyncGenerationStream at once. Create it inside the
    running event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = None, *, api_key: str | None = None,
                 tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_server_name: str | None = None) -> None:
        connection = Connection(target, api_key=api_key, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                tls_key=tls_key, tls_server_name=tls_server_name)
        super().__init__(connection, timeout, connection.aio_channel())
        self._upload_channel: grpc.Channel | None = None  # made by the first upload, with its stub
        self._upload_stub: Any = None

    async def _call(self, method: Any, request: Any, timeout: float | None, adapter: str = "") -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._routing(adapter))
        except grpc.RpcError as exc:
            raise _client_error(exc) from None

    async def generate(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                       adapter: str = "", max_new_tokens: int | None = None, temperature: float = 0.0,
                       top_p: float | None = None, top_k: int = 0, repetition_penalty: float | None = None,
                       seed: int | None = None, stop: Sequence[str] = (), request_id: str = "",
                       timeout: float | None = None) -> Generation:
        msg = _generation_input(prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k,
                                repetition_penalty, seed, stop, request_id)
        r = await self._call(self._stubs.inference.Generate, ipb.GenerateRequest(input=msg), timeout, adapter)
        return _generation(r.summary)

    def generate_stream(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                        adapter: str = "", max_new_tokens: int | None = None, temperature: float = 0.0,
                        top_p: float | None = None, top_k: int = 0, repetition_penalty: float | None = None,
                        seed: int | None = None, stop: Sequence[str] = (), request_id: str = "",
                        timeout: float | None = None) -> AsyncGenerationStream:
        msg = _generation_input(prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k,
                                repetition_penalty, seed, stop, request_id)
        call = self._stubs.inference.GenerateStream(ipb.GenerateStreamRequest(input=msg),
                                                    timeout=self._deadline(timeout), metadata=self._routing(adapter))
        return AsyncGenerationStream(call)

    async def register_adapter(self, name: str, path: str, replace: bool = False,
                               timeout: float | None = None) -> Registration:
        r = await self._call(self._stubs.adapters.RegisterAdapter,
                             apb.RegisterAdapterRequest(name=name, path=path, replace=replace), timeout)
        return Registration(_status(r.adapter), r.created)

    async def upload_adapter(self, name: str, directory: str | Path, replace: bool = False,
                             chunk_bytes: int = 1 << 20, timeout: float | None = None) -> Registration:
        messages = _upload_messages(name, _upload_files(directory, chunk_bytes), replace, chunk_bytes)
        # Sent on a blocking channel, waited for in a worker thread, not on the asyncio channel:
        # when the server ends an upload early (a refused key, role or quota) while a write is in
        # flight, grpc.aio reports INTERNAL "Internal error from Core" instead of the server's
        # status (grpc/grpc#36066; here 7 of 300 refused uploads), where the blocking stack
        # reports it. That stack reads the files in its own thread: the loop is never blocked.
        if self._upload_channel is None:
            self._upload_channel = self._connection.channel()
            self._upload_stub = _Stubs(self._upload_channel).adapters
        call = self._upload_stub.UploadAdapter.future(messages, timeout=self._deadline(timeout),
                                                      metadata=self._metadata)
        try:
            r = await asyncio.to_thread(call.result)
        except grpc.RpcError as exc:
            raise _client_error(exc) from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        return Registration(_status(r.adapter), r.created)

    async def validate_adapter(self, name: str, path: str, timeout: float | None = None) -> Adapter:
        r = await self._call(self._stubs.adapters.ValidateAdapter, apb.ValidateAdapterRequest(name=name, path=path),
                             timeout)
        return _adapter(r.manifest)

    async def unregister_adapter(self, name: str, timeout: float | None = None) -> None:
        await self._call(self._stubs.adapters.UnregisterAdapter, apb.UnregisterAdapterRequest(name=name), timeout)

    async def list_adapters(self, timeout: float | None = None) -> list[Adapter]:
        r = await self._call(self._stubs.adapters.ListAdapters, apb.ListAdaptersRequest(), timeout)
        return [_status(s) for s in r.adapters]

    async def get_adapter(self, name: str, timeout: float | None = None) -> Adapter:
        r = await self._call(self._stubs.adapters.GetAdapter, apb.GetAdapterRequest(name=name), timeout)
        return _status(r.adapter)

    async def pin_adapter(self, name: str, timeout: float | None = None) -> None:
        await self._call(self._stubs.adapters.PinAdapter, apb.PinAdapterRequest(name=name), timeout)

    async def unpin_adapter(self, name: str, timeout: float | None = None) -> None:
        await self._call(self._stubs.adapters.UnpinAdapter, apb.UnpinAdapterRequest(name=name), timeout)

    async def share_adapter(self, name: str, shared: bool = True, timeout: float | None = None) -> Adapter:
        r = await self._call(self._stubs.adapters.ShareAdapter, apb.ShareAdapterRequest(name=name, shared=shared),
                             timeout)
        return _status(r.adapter)

    async def server_info(self, timeout: float | None = None) -> ServerInfo:
        return _server_info(await self._call(self._stubs.info.GetServerInfo, spb.GetServerInfoRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        r = await self._call(self._stubs.health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def close(self) -> None:
        await self._channel.close()
        if self._upload_channel is not None:
            self._upload_channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

