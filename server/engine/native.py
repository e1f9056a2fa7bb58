"""The engine's public face for the server: submit/cancel requests, manage adapters, stats.

Everything that touches the model, the slots or the host cache is handed to the engine
thread (`BatchScheduler`); this class only validates input on the caller's thread and keeps
the registry of adapter names, so a bad request is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from loraserve.base.loading import LoadedBase, load_base
from loraserve.config import EngineConfig
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.input_limits import InputLimits, max_token_bytes
from loraserve.engine.request import GenerationRequest, RequestStream, SamplingParams, encode_input
from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import BatchScheduler
from loraserve.engine.sequence import Sequence
from loraserve.errors import (
    AdapterAlreadyExists,
    AdapterDataLoss,
    AdapterIncompatible,
    AdapterNotFound,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from loraserve.lora.adapter import LoraWeights, parse_adapter
from loraserve.lora.layers import LoraBatchContext
from loraserve.lora.slots import AdapterSlots
from loraserve.lora.wrapping import wrap_model
from loraserve.store.layout import check_adapter_ref
from loraserve.store.peft_files import read_adapter_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter; `key` names this version (a replace makes a new key)."""

    name: str
    key: str
    path: Path
    digest: str
    rank: int
    modules: int


@dataclass(frozen=True)
class CheckedAdapter:
    """What `check_adapter` learned about an adapter directory. Plain data, so it crosses the
    engine process boundary; `token` lets a following `add_adapter` reuse the decoded weights
    instead of reading the files again."""

    name: str
    rank: int
    modules: tuple[str, ...]
    digest: str
    token: str


CHECKED_KEPT = 4
"""Decoded adapters kept between `check_adapter(keep=True)` and `add_adapter`: a handful is
enough, since the registry adds right after it checks (one whose publish then fails, over a quota
say, is dropped by later ones)."""


@dataclass(frozen=True)
class Heartbeat:
    """The engine's sign of life, sent by the engine process every heartbeat interval."""

    since_progress_s: float
    """Seconds since the engine thread last went round its loop (steps, messages, idle wakes)."""
    waiting: int
    running: int


@dataclass(frozen=True)
class EngineStats:
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


class Engine:
    """Multi-LoRA generation on one base. Thread-safe; `submit` may be called from any thread."""

    def __init__(self, base: LoadedBase, config: EngineConfig) -> None:
        self.base = base
        self.config = config
        self.tokenizer = base.tokenizer
        context = LoraBatchContext()
        layers = wrap_model(base.model, config.max_loras + 1, config.max_lora_rank, context, base.dtype,
                            config.target_modules)
        self._base_shapes = {name: (l.in_features, l.out_features) for name, l in layers.items()}
        eos = base.model.generation_config.eos_token_id if base.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self._scheduler = BatchScheduler(config, ModelRunner(base.model, context),
                                         AdapterSlots(layers, config.max_loras), self._load_version,
                                         eos_ids, base.model.config.vocab_size)
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterEntry] = {}
        self._versions: dict[str, AdapterEntry] = {}  # key -> entry, while any request may need it
        self._version_counter = itertools.count(1)
        self._checked: OrderedDict[str, LoraWeights] = OrderedDict()  # token -> weights (held: _lock)
        self._accepting = False
        self._started = False
        self.max_context = getattr(base.model.config, "max_position_embeddings", None)
        self.input_limits = InputLimits(config.max_input_tokens, max_token_bytes(self.tokenizer))

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        return cls(load_base(config.base), config)

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Start the engine thread; with `warmup`, run one short generation first."""
        self._scheduler.start()
        self._started = True
        self._accepting = True
        if warmup:
            ids = self.tokenizer("warm up", add_special_tokens=True).input_ids
            self.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=2))).result()

    @property
    def ready(self) -> bool:
        """True once warmed up and accepting requests."""
        return self._accepting

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (UNAVAILABLE) and wait up to `timeout` seconds for queued and
        running ones to finish; True when everything finished."""
        self._accepting = False
        if not self._started:
            return True
        return self._scheduler.idle.wait(timeout)

    def add_load_observer(self, observe) -> None:
        """`observe(seconds)` is called on the engine thread after each adapter disk load."""
        self._scheduler.load_observers.append(observe)

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` seconds,
        then end the rest (cancelled) and the engine thread."""
        self.drain(drain_timeout)
        if self._started:
            self._scheduler.shutdown()
            self._started = False

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a raw prompt (with BOS) or of chat messages through the base's template."""
        return encode_input(self.tokenizer, prompt, messages)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None,
               stream: RequestStream | None = None) -> RequestStream:
        """Validate and queue a request; its events arrive on the returned stream (bound to
        `loop` for `async for`, or read synchronously when loop is None; or `stream` itself when
        given, as the engine process gives one that forwards its events)."""
        if not self._accepting:
            raise Unavailable("the engine is not accepting requests (starting up or draining)")
        self._validate(request)
        key = None
        if request.adapter:
            with self._lock:
                entry = self._adapters.get(request.adapter)
            if entry is None:
                raise AdapterNotFound(f"adapter {request.adapter!r} is not registered")
            key = entry.key
        request.request_id = request.request_id or uuid.uuid4().hex
        stream = stream or RequestStream(request.request_id, loop)
        detok = IncrementalDetokenizer(self.tokenizer, tuple(request.sampling.stop))
        if not self._scheduler.post(Sequence.create(request, stream, key, detok), self.config.max_queue):
            raise ResourceExhausted(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
        return stream

    def generate(self, prompt: str, adapter: str | None = None, **sampling) -> str:
        """Convenience: one blocking generation, returns the text."""
        request = GenerationRequest(self.encode(prompt), SamplingParams(**sampling), adapter)
        return self.submit(request).result().text

    def cancel(self, stream: RequestStream) -> None:
        stream.cancel()
        self._scheduler.wake()

    def _validate(self, request: GenerationRequest) -> None:
        request.sampling.validate(self.config.max_new_tokens_limit)
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidArgument("the input is empty: give a prompt or messages")
        if len(ids) > self.config.max_input_tokens:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens, over max_input_tokens {self.config.max_input_tokens}")
        vocab = self.base.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if self.max_context and len(ids) + request.sampling.max_new_tokens > self.max_context:
            raise InvalidArgument(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens")
        if request.adapter:
            check_adapter_ref(request.adapter)

    # ---- adapters ----------------------------------------------------------------------
    def read_adapter(self, name: str, path: str | Path) -> tuple[LoraWeights, str]:
        """Full validation of an adapter directory against this base: its decoded weights and
        sha256 digest, publishing nothing."""
        check_adapter_ref(name)
        config, tensors, digest = read_adapter_dir(path, name)
        weights = parse_adapter(name, config, tensors, self._base_shapes, self.config.max_lora_rank, self.base.dtype)
        return weights, digest

    def check_adapter(self, name: str, path: str | Path, keep: bool = False) -> CheckedAdapter:
        """`read_adapter` as plain data; with `keep`, the decoded weights are kept a little while
        for the `add_adapter` that follows (a check that only validates keeps nothing)."""
        weights, digest = self.read_adapter(name, path)
        token = uuid.uuid4().hex
        if keep:
            with self._lock:
                self._checked[token] = weights
                while len(self._checked) > CHECKED_KEPT:
                    self._checked.popitem(last=False)
        return CheckedAdapter(name, weights.rank, tuple(sorted(weights.modules)), digest, token)

    def add_adapter(self, name: str, path: str | Path, replace: bool = False,
                    checked: CheckedAdapter | None = None) -> AdapterEntry:
        """Register (or with `replace`, swap) an adapter. Same name and content is a no-op;
        different content without `replace` is ALREADY_EXISTS. Requests already running on the
        old version finish on it; later ones get the new one. `checked` is `check_adapter`'s
        result for these exact bytes when the caller has it (its weights are then reused)."""
        with self._lock:
            weights = self._checked.pop(checked.token, None) if checked is not None and checked.name == name else None
        if weights is None:
            weights, digest = self.read_adapter(name, path)
            if checked is not None and digest != checked.digest:
                raise AdapterIncompatible(f"adapter {name!r} changed on disk since it was checked")
        else:
            digest = checked.digest
        with self._lock:
            old = self._adapters.get(name)
            if old is not None and old.digest == digest:
                return old
            if old is not None and not replace:
                raise AdapterAlreadyExists(f"adapter {name!r} is already registered with different content")
            entry = AdapterEntry(name, f"{name}#{next(self._version_counter)}", Path(path), digest,
                                 weights.rank, len(weights.modules))
            self._adapters[name] = entry
            self._versions[entry.key] = entry
        pinned = old is not None and old.key in self._scheduler.slots.pinned()
        self._on_engine(lambda: self._warm_host(entry.key, weights))
        if old is not None:
            self._retire(old, f"adapter {name!r} was replaced before the request started; retry")
            if pinned:
                self.pin_adapter(name)
        return entry

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` get NOT_FOUND at once; running ones finish on its weights;
        queued ones that had not started end NOT_FOUND."""
        with self._lock:
            entry = self._adapters.pop(name, None)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        self._retire(entry, f"adapter {name!r} was removed before the request started")

    def _retire(self, entry: AdapterEntry, message: str) -> None:
        def drop() -> None:
            self._scheduler.fail_waiting_for(entry.key, message)
            self._scheduler.host.discard(entry.key)
            self._scheduler.slots.drop(entry.key)
            with self._lock:
                self._versions.pop(entry.key, None)
        self._on_engine(drop)

    def pin_adapter(self, name: str) -> None:
        """Keep the adapter in a slot until unpinned (never evicted)."""
        entry = self._entry(name)
        weights, _ = self.read_adapter(name, entry.path)

        def pin() -> None:
            self._scheduler.slots.pin(entry.key, weights)
            self._scheduler.host.put(entry.key, weights, keep=self._scheduler.slots.pinned())
        self._on_engine(pin)

    def unpin_adapter(self, name: str) -> None:
        entry = self._entry(name)
        self._on_engine(lambda: self._scheduler.slots.unpin(entry.key))

    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every module that has LoRA slots."""
        return dict(self._base_shapes)

    def preload_adapter(self, name: str) -> None:
        """Decode an adapter into host memory now, so its first request skips the disk."""
        entry = self._entry(name)
        weights, _ = self.read_adapter(name, entry.path)
        self._on_engine(lambda: self._warm_host(entry.key, weights))

    def _warm_host(self, key: str, weights: LoraWeights) -> None:
        """Engine thread: put weights read from disk by a caller into the host tier (a disk load)."""
        self._scheduler.tiers.disk_loads += 1
        self._scheduler.host.put(key, weights, keep=self._scheduler.slots.pinned())

    def has_adapter(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    def adapters(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda e: e.name)

    def adapter_tier(self, name: str) -> tuple[str, bool]:
        """('gpu' | 'cpu' | 'disk', pinned) for a registered adapter."""
        entry = self._entry(name)
        slots, host = self._scheduler.slots, self._scheduler.host

        def read() -> tuple[str, bool]:
            tier = "gpu" if entry.key in slots.resident() else "cpu" if entry.key in host.keys() else "disk"
            return tier, entry.key in slots.pinned()
        return self._on_engine(read)

    def _entry(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._adapters.get(name)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return entry

    def _load_version(self, key: str) -> LoraWeights:
        """Loader thread: read a registered version's files from the store and decode them."""
        with self._lock:
            entry = self._versions.get(key)
        if entry is None:
            raise AdapterNotFound("the adapter was removed before the request started")
        if not entry.path.is_dir():  # another replica removed it from a shared store meanwhile
            raise AdapterNotFound(f"adapter {entry.name!r} was removed before the request started")
        try:
            weights, digest = self.read_adapter(entry.name, entry.path)
        except AdapterIncompatible as exc:  # it passed these checks when it was registered
            digest, reason = None, exc.message
        else:
            reason = "their sha256 differs"
        if digest != entry.digest:
            log.error("adapter %s: its stored files no longer match what was registered (%s); not served",
                      entry.name, reason)
            raise AdapterDataLoss(f"adapter {entry.name!r}: its stored files no longer match what was registered "
                                  "(changed on disk); the operator must publish it again")
        return weights

    def _on_engine(self, fn) -> object:
        if not self._started:
            return fn()  # before start nothing else runs on the engine's state
        return self._scheduler.call(fn).result()

    # ---- observability -----------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        """Read from any thread without waiting for the engine thread (that is the point: it
        tells whether the engine thread is stuck)."""
        s = self._scheduler
        return Heartbeat(time.monotonic() - s.progress_at, s.num_waiting, s.num_running)

    def set_idle_wait(self, seconds: float) -> None:
        """How long an idle engine thread sleeps between looks at its inbox (<= a heartbeat)."""
        self._scheduler.idle_wait_s = seconds

    def stats(self) -> EngineStats:
        """A consistent snapshot, taken on the engine thread between two steps."""
        return self._on_engine(self._snapshot)

    def _snapshot(self) -> EngineStats:
        s = self._scheduler

        def key_names(keys) -> list[str]:
            return sorted(k.rsplit("#", 1)[0] for k in keys)
        return EngineStats(
            waiting=s.num_waiting, running=s.num_running, batch_size=s.last_batch_size,
            slots_resident=key_names(s.slots.resident()), slots_in_use=key_names(s.slots.in_use()),
            slots_pinned=key_names(s.slots.pinned()), host_cached=key_names(s.host.keys()),
            host_bytes=s.host.nbytes, slot_loads_total=s.slots.loads_total,
            slot_evictions_total=s.slots.evictions_total, host_evictions_total=s.host.evictions_total,
            gpu_hits_total=s.tiers.gpu_hits, cpu_hits_total=s.tiers.cpu_hits,
            disk_loads_total=s.tiers.disk_loads, disk_load_seconds_total=s.tiers.disk_load_seconds,
            running_adapters=s.running_adapters(), waiting_adapters=s.waiting_adapters())
