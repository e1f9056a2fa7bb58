"""AdapterService: protobuf <-> AdapterRegistry. Blocking store and engine work runs in a
worker thread so the event loop keeps serving generation traffic."""

from __future__ import annotations

import asyncio
import logging

from server.api.gen.loraserve.v1 import adapters_pb2 as pb
from server.api.gen.loraserve.v1 import adapters_pb2_grpc
from server.api.status import abort
from server.engine.registry import AdapterRegistry, AdapterStatus
from server.errors import InvalidArgument, ResourceExhausted, Unavailable
from server.store.peft_files import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)
TIERS = {"gpu": pb.RESIDENCY_TIER_GPU, "cpu": pb.RESIDENCY_TIER_CPU, "disk": pb.RESIDENCY_TIER_DISK}


def manifest_to_proto(m) -> pb.AdapterManifest:
    return pb.AdapterManifest(
        name=m.name, files=[pb.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in m.files],
        r=m.r, lora_alpha=m.lora_alpha, target_modules=list(m.target_modules), base_fingerprint=m.base_fingerprint,
        size_bytes=m.size_bytes, created_time=m.created_time, source=m.source)


def status_to_proto(s: AdapterStatus) -> pb.AdapterStatus:
    return pb.AdapterStatus(manifest=manifest_to_proto(s.manifest), tier=TIERS[s.tier], pinned=s.pinned)


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, registry: AdapterRegistry) -> None:
        self._registry = registry

    async def _call(self, context, fn, *args):
        try:
            if not self._registry.engine.ready:
                raise Unavailable("the server is starting up or draining; retry shortly")
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:
            await abort(context, exc)

    async def RegisterAdapter(self, request, context):
        status, created = await self._call(context, self._registry.register, request.name, request.path,
                                           request.replace)
        return pb.RegisterAdapterResponse(adapter=status_to_proto(status), created=created)

    async def UploadAdapter(self, request_iterator, context):
        header = None
        files: dict[str, bytearray] = {}
        total = 0
        try:
            async for message in request_iterator:
                part = message.WhichOneof("part")
                if header is None:
                    if part != "header":
                        raise InvalidArgument("the first upload message must be the header (name, options)")
                    header = message.header
                    continue
                if part != "chunk":
                    raise InvalidArgument("only one header is allowed, at the start")
                name = message.chunk.file_name
                if name not in (CONFIG_FILE, WEIGHTS_FILE):
                    raise InvalidArgument(f"only {CONFIG_FILE} and {WEIGHTS_FILE} may be uploaded, got {name!r}")
                total += len(message.chunk.data)
                if total > self._registry.max_adapter_bytes:
                    raise ResourceExhausted(f"upload is over the per-adapter limit of "
                                            f"{self._registry.max_adapter_bytes:,} bytes")
                files.setdefault(name, bytearray()).extend(message.chunk.data)
            if header is None:
                raise InvalidArgument("the upload is empty: send a header, then file chunks")
        except Exception as exc:
            await abort(context, exc)
        status, created = await self._call(context, self._registry.upload, header.name,
                                           {k: bytes(v) for k, v in files.items()}, header.replace)
        return pb.UploadAdapterResponse(adapter=status_to_proto(status), created=created)


    async def ValidateAdapter(self, request, context):
        manifest = await self._call(context, self._registry.validate, request.name, request.path)
        return pb.ValidateAdapterResponse(manifest=manifest_to_proto(manifest))

    async def UnregisterAdapter(self, request, context):
        await self._call(context, self._registry.unregister, request.name)
        return pb.UnregisterAdapterResponse()

    async def ListAdapters(self, request, context):
        statuses = await self._call(context, self._registry.list)
        return pb.ListAdaptersResponse(adapters=[status_to_proto(s) for s in statuses])

    async def GetAdapter(self, request, context):
        status = await self._call(context, self._registry.get, request.name)
        return pb.GetAdapterResponse(adapter=status_to_proto(status))

    async def PinAdapter(self, request, context):
        await self._call(context, self._registry.pin, request.name)
        return pb.PinAdapterResponse()

    async def UnpinAdapter(self, request, context):
        await self._call(context, self._registry.unpin, request.name)
        return pb.UnpinAdapterResponse()
