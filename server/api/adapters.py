"""AdapterService: protobuf <-> AdapterRegistry, behind the access policy. Every call is
authenticated and authorized first (`loraserve.api.access`), adapter names are resolved to
'<tenant>/<name>' ids, and every management call leaves one audit line. Blocking store and
engine work runs in a worker thread so the event loop keeps serving generation traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from loraserve.access.principal import Principal
from loraserve.api.access import AccessControl, AdapterRef
from loraserve.api.audit import audit
from loraserve.api.status import abort, as_named, status_of
from loraserve.errors import AdapterNotFound, InvalidArgument, LoraserveError, ResourceExhausted, Unavailable
from loraserve.proto.v1 import adapters_pb2 as pb
from loraserve.proto.v1 import adapters_pb2_grpc
from loraserve.registry.registry import AdapterRegistry, AdapterStatus
from loraserve.store.layout import split_adapter_id
from loraserve.store.peft_files import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)
TIERS = {"gpu": pb.RESIDENCY_TIER_GPU, "cpu": pb.RESIDENCY_TIER_CPU, "disk": pb.RESIDENCY_TIER_DISK}
Work = Callable[[Principal], Awaitable[tuple[object, str]]]  # -> (response, sha256 for the audit line)


def manifest_to_proto(m) -> pb.AdapterManifest:
    tenant, name = split_adapter_id(m.adapter_id)
    return pb.AdapterManifest(
        name=name, tenant=tenant,
        files=[pb.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in m.files],
        r=m.r, lora_alpha=m.lora_alpha, target_modules=list(m.target_modules), base_fingerprint=m.base_fingerprint,
        size_bytes=m.size_bytes, created_time=m.created_time, source=m.source)


def status_to_proto(s: AdapterStatus) -> pb.AdapterStatus:
    return pb.AdapterStatus(manifest=manifest_to_proto(s.manifest), tier=TIERS[s.tier], pinned=s.pinned,
                            shared=s.shared)


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, registry: AdapterRegistry, access: AccessControl, max_uploads: int = 4,
                 max_uploads_per_tenant: int = 2) -> None:
        """`max_uploads` / `max_uploads_per_tenant`: uploads in progress at once on this server /
        for one tenant; beyond, RESOURCE_EXHAUSTED (each holds a staging file and a disk writer)."""
        self._registry = registry
        self._access = access
        self._max_uploads = max_uploads
        self._max_uploads_per_tenant = max_uploads_per_tenant
        self._uploads: dict[str, int] = {}  # tenant -> uploads in progress (event loop only: no lock)

    async def _serve(self, context, action: str, adapter: str | Callable[[], str], role: str, work: Work,
                     management: bool = True):
        """Authenticate, authorize, run `work`; map errors to statuses; audit management calls
        (`adapter` may be a callable when the name arrives inside the call, as in an upload)."""
        caller, digest, result = None, "", "OK"
        try:
            if not self._registry.engine.ready:
                raise Unavailable("the server is starting up or draining; retry shortly")
            caller = self._access.caller(context.invocation_metadata(), context.peer(), role, management)
            response, digest = await work(caller)
            return response
        except Exception as exc:  # mapped to a status in one place; nothing is swallowed
            result = status_of(exc)[0].name
            await abort(context, exc, call=action)
        finally:
            if management:
                audit(caller, action, adapter() if callable(adapter) else adapter, digest, result, context.peer())

    @staticmethod
    async def _run(ref: AdapterRef | None, fn, *args):
        """`fn(*args)` on a worker thread; a missing adapter is reported by the name the client
        used, so another tenant's adapter and a missing one read the same."""
        try:
            return await asyncio.to_thread(fn, *args)
        except AdapterNotFound:
            if ref is None:
                raise
            raise AdapterNotFound(f"adapter {ref.requested!r} is not registered") from None
        except LoraserveError as exc:
            raise exc if ref is None else as_named(exc, ref.adapter_id, ref.requested)

    async def RegisterAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_change(request.name, caller, creating=True)
            status, created = await self._run(ref, self._registry.register, ref.adapter_id, request.path, request.replace,
                                              self._access.limits(ref.tenant))
            return pb.RegisterAdapterResponse(adapter=status_to_proto(status), created=created), status.manifest.digest
        return await self._serve(context, "RegisterAdapter", request.name, "manage", work)

    async def UploadAdapter(self, request_iterator, context):
        header_name = ""

        async def work(caller):  # authenticated before a byte of the upload is read
            nonlocal header_name
            messages = aiter(request_iterator)
            header = await self._read_header(messages)
            header_name = header.name
            ref = self._access.for_change(header.name, caller, creating=True)
            with self._upload_place(ref.tenant):
                upload = self._registry.open_upload(ref.adapter_id)  # no I/O: held before any await
                try:
                    await self._receive(messages, upload)
                    status, created = await self._run(ref, self._registry.upload, upload, header.replace,
                                                      self._access.limits(ref.tenant))
                finally:  # also when the client goes away: nothing of the upload stays behind
                    await asyncio.shield(asyncio.to_thread(upload.discard))
            return pb.UploadAdapterResponse(adapter=status_to_proto(status), created=created), status.manifest.digest
        return await self._serve(context, "UploadAdapter", lambda: header_name, "manage", work)

    @staticmethod
    async def _read_header(messages) -> pb.UploadHeader:
        try:
            first = await anext(messages)
        except StopAsyncIteration:
            raise InvalidArgument("the upload is empty: send a header, then file chunks") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first upload message must be the header (name, options)")
        return first.header

    @staticmethod
    async def _receive(messages, upload) -> None:
        """Write each chunk to the staging files as it arrives (memory: one chunk at a time)."""
        async for message in messages:
            if message.WhichOneof("part") != "chunk":
                raise InvalidArgument("only one header is allowed, at the start")
            chunk = message.chunk
            if chunk.file_name not in (CONFIG_FILE, WEIGHTS_FILE):
                raise InvalidArgument(f"only {CONFIG_FILE} and {WEIGHTS_FILE} may be uploaded, "
                                      f"got {chunk.file_name!r}")
            if chunk.data:
                await asyncio.to_thread(upload.write, chunk.file_name, chunk.data)

    @contextlib.contextmanager
    def _upload_place(self, tenant: str):
        """One of the server's and the tenant's upload places, for the upload's duration."""
        total = sum(self._uploads.values())
        if total >= self._max_uploads:
            raise ResourceExhausted(f"the server is receiving {total} uploads, its limit "
                                    "(max_concurrent_uploads); retry when one has finished")
        mine = self._uploads.get(tenant, 0)
        if mine >= self._max_uploads_per_tenant:
            raise ResourceExhausted(f"tenant {tenant!r} has {mine} uploads in progress, its limit "
                                    "(max_concurrent_uploads_per_tenant); retry when one has finished")
        self._uploads[tenant] = mine + 1
        try:
            yield
        finally:
            self._uploads[tenant] -= 1

    async def ValidateAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_change(request.name, caller, creating=True)
            manifest = await self._run(ref, self._registry.validate, ref.adapter_id, request.path)
            return pb.ValidateAdapterResponse(manifest=manifest_to_proto(manifest)), manifest.digest
        return await self._serve(context, "ValidateAdapter", request.name, "manage", work)

    async def UnregisterAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_change(request.name, caller, creating=False)
            status = await self._run(ref, self._registry.status, ref.adapter_id)
            await self._run(ref, self._registry.unregister, ref.adapter_id)
            return pb.UnregisterAdapterResponse(), status.manifest.digest
        return await self._serve(context, "UnregisterAdapter", request.name, "manage", work)

    async def ListAdapters(self, request, context):
        async def work(caller):
            statuses = await self._run(None, self._registry.list)
            shown = [status_to_proto(s) for s in statuses if self._access.visible(s.manifest.adapter_id, caller)]
            return pb.ListAdaptersResponse(adapters=shown), ""
        return await self._serve(context, "ListAdapters", "", "generate", work, management=False)

    async def GetAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_use(request.name, caller)
            status = await self._run(ref, self._registry.get, ref.adapter_id)
            return pb.GetAdapterResponse(adapter=status_to_proto(status)), ""
        return await self._serve(context, "GetAdapter", request.name, "generate", work, management=False)

    async def PinAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_change(request.name, caller, creating=False)
            await self._run(ref, self._registry.pin, ref.adapter_id)
            return pb.PinAdapterResponse(), ""
        return await self._serve(context, "PinAdapter", request.name, "admin", work)

    async def UnpinAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_change(request.name, caller, creating=False)
            await self._run(ref, self._registry.unpin, ref.adapter_id)
            return pb.UnpinAdapterResponse(), ""
        return await self._serve(context, "UnpinAdapter", request.name, "admin", work)

    async def ShareAdapter(self, request, context):
        async def work(caller):
            ref = self._access.for_change(request.name, caller, creating=False)
            status = await self._run(ref, self._registry.share, ref.adapter_id, request.shared)
            return pb.ShareAdapterResponse(adapter=status_to_proto(status)), status.manifest.digest
        action = "ShareAdapter" if request.shared else "UnshareAdapter"
        return await self._serve(context, action, request.name, "admin", work)
