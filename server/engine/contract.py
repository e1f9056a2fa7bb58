"""The engine contract: what the server asks of an engine, and the plain data that crosses it.

The gRPC front end, the adapter registry and the metrics talk to an engine only through
`Engine`. It is implemented by the in-process engine (`loraserve.engine.native.NativeEngine`)
and by the handle on an engine running in its own process (`loraserve.engine.remote.
RemoteEngine`), and one contract test suite runs against each. Torch-free: the front end
imports it without loading a model.

Methods marked `@remote` are the engine's own work: the engine process answers them over its
pipe (its call list is `remote_calls()`, derived from this class), and the remote handle
forwards every one it does not define itself. Everything else is answered where the caller is
(encoding, the names of registered adapters, health), never waiting on the engine.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from loraserve.config import EngineConfig
from loraserve.engine.input_limits import InputLimits
from loraserve.engine.request import GenerationRequest, RequestStream

REMOTE = "__engine_remote__"


def remote(method: Callable) -> Callable:
    """Marks a contract method as the engine's own work (answered over the engine process's pipe)."""
    setattr(method, REMOTE, True)
    return method


@dataclass(frozen=True)
class BaseInfo:
    """The served base, as the server reports it and checks adapters against it."""

    fingerprint: str
    """'sha256:...' of the base's config and weights: an adapter's manifest must name it."""
    model_type: str
    """The transformers model_type, e.g. deepseek_v3."""
    model_dir: Path
    """Where the base's files are (its tokenizer is loaded from there too)."""
    max_context: int | None
    lora_module_shapes: dict[str, tuple[int, int]]
    """(in_features, out_features) of every module that has LoRA slots."""
    quantization: str = "none"
    """What the weights run as: the --quantization applied at load, or `<method> (checkpoint)`."""
    lora_expert_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """(in_features, out_features, experts) of one expert of every fused routed-expert parameter
    with LoRA slots (`<experts module>.gate_up_proj`); empty where the engine serves none."""


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter; `version` names this content of it (a replace makes a new one, and
    requests that started on the old version finish on it)."""

    adapter_id: str
    version: str
    path: Path
    digest: str
    rank: int
    modules: int


@dataclass(frozen=True)
class AdmittedFiles:
    """What admission already established about an adapter directory the store wrote itself:
    its parsed config (`loraserve.store.adapter_config.AdapterConfig`) and the digest of its
    files, so the engine neither parses nor hashes them again."""

    config: object
    digest: str


@dataclass(frozen=True)
class CheckedAdapter:
    """What `check_adapter` learned about an adapter directory; `token` lets the `add_adapter`
    that follows reuse the decoded weights instead of reading the files again."""

    adapter_id: str
    rank: int
    modules: tuple[str, ...]
    digest: str
    token: str


@dataclass(frozen=True)
class Heartbeat:
    """The engine's sign of life, sent every heartbeat interval by the engine process."""

    since_progress_s: float
    """Seconds since the engine thread last went round its loop (steps, messages, idle wakes)."""
    waiting: int
    running: int


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's state, taken between two steps (adapters by id)."""

    waiting: int
    running: int
    batch_size: int
    slots_resident: list[str]
    slots_in_use: list[str]
    slots_pinned: list[str]
    host_cached: list[str]
    host_bytes: int
    slot_loads_total: int
    slot_evictions_total: int
    host_evictions_total: int
    gpu_hits_total: int
    cpu_hits_total: int
    disk_loads_total: int
    disk_load_seconds_total: float
    running_adapters: list[str]
    waiting_adapters: list[str]
    prefix_cache_hits_total: int = 0
    prefix_cache_misses_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    """Prompt tokens whose prefill the prefix cache saved."""
    prefix_cache_bytes: int = 0


@runtime_checkable
class Engine(Protocol):
    """Multi-LoRA generation on one base, as the server uses it. Thread-safe. Errors are the
    typed ones of `loraserve.errors` (NOT_FOUND for an unknown adapter, INVALID_ARGUMENT for a
    bad request, UNAVAILABLE when not accepting, ...)."""

    config: EngineConfig
    base: BaseInfo | None
    """None until the base is loaded."""
    input_limits: InputLimits | None

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """Whether the base is loaded (`base` and `input_limits` are set)."""

    def wait_loaded(self) -> None:
        """Block until the base is loaded; its load error is raised here."""

    @remote
    def start(self, warmup: bool = True) -> None:
        """Start generating; with `warmup`, after one short generation."""

    @property
    def ready(self) -> bool:
        """Started, not draining, and healthy."""

    def health(self) -> str | None:
        """None while the engine is alive and making progress, else why it is not."""

    @remote
    def drain(self, timeout: float) -> bool:
        """Refuse new requests (UNAVAILABLE) and wait up to `timeout` s for the rest; whether all finished."""

    @remote
    def stop(self, drain_timeout: float = 0.0) -> None:
        """Drain for up to `drain_timeout` s, end what is left (cancelled) and stop."""

    def add_load_observer(self, observe: Callable[[float], None]) -> None:
        """`observe(seconds)` after each adapter read from disk."""

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a raw prompt (BOS added) or of chat messages through the base's template."""

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Validate and queue a request; its events (or its refusal) arrive on the stream, bound
        to `loop` for `async for`, or read synchronously when None."""

    def cancel(self, stream: RequestStream) -> None:
        """Drop the request; it ends within one step."""

    # ---- adapters ----------------------------------------------------------------------
    @remote
    def check_adapter(self, adapter_id: str, path: str | Path, keep: bool = False,
                      admitted: AdmittedFiles | None = None) -> CheckedAdapter:
        """Every check of an adapter directory against this base, publishing nothing; with
        `keep`, the decoded weights wait a little for the `add_adapter` that follows."""

    @remote
    def add_adapter(self, adapter_id: str, path: str | Path, replace: bool = False,
                    checked: CheckedAdapter | None = None) -> AdapterEntry:
        """Serve an adapter (same content again: a no-op; other content: ALREADY_EXISTS unless `replace`)."""

    @remote
    def remove_adapter(self, adapter_id: str) -> None:
        """New requests get NOT_FOUND at once, queued ones end NOT_FOUND, running ones finish."""

    @remote
    def pin_adapter(self, adapter_id: str) -> None:
        """Keep the adapter in an accelerator slot until unpinned."""

    @remote
    def unpin_adapter(self, adapter_id: str) -> None:
        """Let the adapter's slot be evicted again."""

    @remote
    def preload_adapter(self, adapter_id: str) -> None:
        """Decode the adapter into host memory now, so its first request skips the disk."""

    @remote
    def adapter_tier(self, adapter_id: str) -> tuple[str, bool]:
        """('gpu' | 'cpu' | 'disk', pinned)."""

    def has_adapter(self, adapter_id: str) -> bool:
        """Whether the adapter is registered."""

    def adapters(self) -> list[AdapterEntry]:
        """The registered adapters, by id."""

    # ---- observability -----------------------------------------------------------------
    @remote
    def stats(self) -> EngineStats:
        """A consistent snapshot of the engine's state."""


def remote_calls() -> frozenset[str]:
    """The contract methods the engine process answers over its pipe."""
    return frozenset(name for name, member in vars(Engine).items() if getattr(member, REMOTE, False))


def forward_remote_calls(cls: type) -> type:
    """Class decorator for a handle on an engine elsewhere: every remote contract method that
    `cls` does not define itself becomes `self._call(name, *args, **kwargs)`, with the
    contract's signature and docstring."""
    for name in remote_calls():
        if name in vars(cls):
            continue
        contract_method = vars(Engine)[name]

        def forward(self, *args, _name=name, **kwargs):
            return self._call(_name, *args, **kwargs)
        forward.__name__ = forward.__qualname__ = name
        forward.__doc__ = contract_method.__doc__
        forward.__signature__ = inspect.signature(contract_method)
        setattr(cls, name, forward)
    return cls
