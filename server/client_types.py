"""What the loraserve clients return: `LoraserveClientError` and the frozen result dataclasses
(Generation, StreamEvent, Adapter, Registration, ServerInfo, ...), plus the conversions from
response protos and gRPC errors into them. `loraserve.client` re-exports the public names.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import server_info_pb2 as spb

_FINISH_REASONS = {ipb.FINISH_REASON_LENGTH: "length", ipb.FINISH_REASON_STOP: "stop",
                   ipb.FINISH_REASON_EOS: "eos", ipb.FINISH_REASON_CANCELLED: "cancelled"}
_TIERS = {apb.RESIDENCY_TIER_GPU: "gpu", apb.RESIDENCY_TIER_CPU: "cpu", apb.RESIDENCY_TIER_DISK: "disk"}


class LoraserveClientError(Exception):
    """A failed call. `code` is the gRPC status name (NOT_FOUND, UNAVAILABLE, ...); errors found
    before anything is sent (bad arguments, a missing upload file) use INVALID_ARGUMENT."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Generation:
    """One finished generation. finish_reason is length, stop, eos or cancelled; timings are
    seconds from arrival on the server (queue_s: waiting, first_token_s and total_s: since arrival)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str  # empty for the base model
    request_id: str
    queue_s: float
    first_token_s: float
    total_s: float


@dataclass(frozen=True)
class StreamEvent:
    """New text from a streamed generation (never a split character) and the tokens behind it."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class AdapterFile:
    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Adapter:
    """An adapter's manifest (PEFT vocabulary) and where it lives now. tier is gpu, cpu or disk;
    it is empty for the result of `validate_adapter`, which registers nothing."""

    name: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_fingerprint: str
    size_bytes: int
    created_time: str  # RFC 3339, UTC
    source: str  # register, upload or trainer
    files: tuple[AdapterFile, ...]
    tier: str = ""
    pinned: bool = False
    tenant: str = ""
    """The tenant it belongs to; address it as `name` from that tenant, `tenant/name` from others."""
    shared: bool = False
    """An admin shared it with every tenant."""

    @property
    def full_name(self) -> str:
        """'tenant/name': how any caller that may use it can address it."""
        return f"{self.tenant}/{self.name}" if self.tenant else self.name


@dataclass(frozen=True)
class Registration:
    """Result of register/upload: created is False when the same name and content already existed."""

    adapter: Adapter
    created: bool


@dataclass(frozen=True)
class Limits:
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    max_batch_size: int
    max_queue: int
    max_input_tokens: int
    max_new_tokens: int
    max_input_bytes: int = 0
    """Longest prompt in UTF-8 bytes that can fit max_input_tokens (0: an older server)."""


@dataclass(frozen=True)
class ServerInfo:
    base_model: str
    base_fingerprint: str
    quantization: str
    architecture: str
    version: str
    limits: Limits
    engine: str = ""
    """native or vllm (empty from a server older than the field)."""
    engine_reason: str = ""


def _client_error(exc: grpc.RpcError) -> LoraserveClientError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    return LoraserveClientError(code.name if code is not None else "UNKNOWN", details or str(exc))



def _generation(s: ipb.GenerationSummary) -> Generation:
    return Generation(text=s.text, token_ids=tuple(s.token_ids),
                      finish_reason=_FINISH_REASONS.get(s.finish_reason, "unspecified"),
                      prompt_tokens=s.usage.prompt_tokens, completion_tokens=s.usage.completion_tokens,
                      adapter=s.adapter, request_id=s.request_id, queue_s=s.timings.queue_seconds,
                      first_token_s=s.timings.first_token_seconds, total_s=s.timings.total_seconds)


def _stream_item(msg: ipb.GenerateStreamResponse) -> StreamEvent | Generation:
    if msg.WhichOneof("event") == "summary":
        return _generation(msg.summary)
    return StreamEvent(text=msg.delta.text, token_ids=tuple(msg.delta.token_ids))


def _adapter(m: apb.AdapterManifest, tier: str = "", pinned: bool = False, shared: bool = False) -> Adapter:
    return Adapter(name=m.name, r=m.r, lora_alpha=m.lora_alpha, target_modules=tuple(m.target_modules),
                   base_fingerprint=m.base_fingerprint, size_bytes=m.size_bytes, created_time=m.created_time,
                   source=m.source, files=tuple(AdapterFile(f.name, f.sha256, f.size_bytes) for f in m.files),
                   tier=tier, pinned=pinned, tenant=m.tenant, shared=shared)


def _status(s: apb.AdapterStatus) -> Adapter:
    return _adapter(s.manifest, _TIERS.get(s.tier, "unspecified"), s.pinned, s.shared)


def _server_info(r: spb.GetServerInfoResponse) -> ServerInfo:
    limits = Limits(**{name: getattr(r.limits, name) for name in Limits.__dataclass_fields__})
    return ServerInfo(base_model=r.base_model, base_fingerprint=r.base_fingerprint, quantization=r.quantization,
                      architecture=r.architecture, version=r.version, limits=limits, engine=r.engine,
                      engine_reason=r.engine_reason)
