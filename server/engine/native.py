"""The native engine: multi-LoRA generation on transformers in this process (the embedded
default on CPU hosts, and the reference other engines are checked against).

It implements the engine contract (`loraserve.engine.contract.Engine`). Everything that
touches the model, the slots or the host cache is handed to the engine thread
(`BatchScheduler`); this class validates input on the caller's thread and keeps the registry of
adapter ids and versions, so a bad request is refused before it is queued.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraserve.base.loading import LoadedBase, load_base
from loraserve.config import EngineConfig
from loraserve.engine.contract import AdapterEntry, AdmittedFiles, BaseInfo, CheckedAdapter, EngineStats, Heartbeat
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.input_limits import InputLimits, max_token_bytes
from loraserve.engine.request import (
    GenerationRequest,
    RequestStream,
    SamplingParams,
    encode_input,
    validate_request,
    warm_up,
)
from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import BatchScheduler
from loraserve.engine.sequence import Sequence
from loraserve.errors import (
    AdapterAlreadyExists,
    AdapterDataLoss,
    AdapterIncompatible,
    AdapterNotFound,
    ResourceExhausted,
    Unavailable,
)
from loraserve.lora.adapter import LoraWeights, parse_adapter
from loraserve.lora.batch_context import LoraBatchContext
from loraserve.lora.expert_layers import wrap_experts
from loraserve.lora.slots import AdapterSlots
from loraserve.lora.wrapping import wrap_model
from loraserve.store.layout import check_adapter_ref
from loraserve.store.peft_files import read_adapter_dir

log = logging.getLogger(__name__)

CHECKED_KEPT = 4
"""Decoded adapters kept between `check_adapter(keep=True)` and `add_adapter`: a handful is
enough, since the registry adds right after it checks (one whose publish then fails, over a quota
say, is dropped by later ones)."""


class NativeEngine:
    """Multi-LoRA generation on one base. Thread-safe; `submit` may be called from any thread."""

    def __init__(self, base: LoadedBase, config: EngineConfig) -> None:
        self.loaded_base = base
        """The model itself (the contract's `base` only describes it)."""
        self.config = config
        self.tokenizer = base.tokenizer
        context = LoraBatchContext()
        layers = wrap_model(base.model, config.max_loras + 1, config.max_lora_rank, context, base.dtype,
                            config.target_modules)
        self._base_shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
        experts = wrap_experts(base.model, config.max_loras + 1, context, base.dtype, config.target_modules)
        self._expert_shapes = {name: (slots.in_features, slots.out_features, slots.num_experts)
                               for name, slots in experts.items()}
        eos = base.model.generation_config.eos_token_id if base.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        runner = ModelRunner(base.model, context, kv_cache_bytes=config.kv_cache_bytes)
        self._scheduler = BatchScheduler(config, runner,
                                         AdapterSlots({**layers, **experts}, config.max_loras), self._load_version,
                                         eos_ids, base.model.config.vocab_size)
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterEntry] = {}  # adapter id -> its current version
        self._versions: dict[str, AdapterEntry] = {}  # version -> entry, while any request may need it
        self._version_counter = itertools.count(1)
        self._checked: OrderedDict[str, LoraWeights] = OrderedDict()  # token -> weights (held: _lock)
        self._accepting = False
        self._started = False
        self._stopped = False
        self._executor: ThreadPoolExecutor | None = None
        self.max_context = getattr(base.model.config, "max_position_embeddings", None)
        self.base = BaseInfo(base.fingerprint, base.model_type, base.model_dir, self.max_context,
                             dict(self._base_shapes), base.quantization, dict(self._expert_shapes))
        self.input_limits = InputLimits(config.max_input_tokens, max_token_bytes(self.tokenizer))

    @classmethod
    def load(cls, config: EngineConfig, on_own_thread: bool = False) -> NativeEngine:
        """Load the base and wrap it. With `on_own_thread`, on a thread that then runs the
        engine loop: with several torch CPU threads, once a second thread has run parallel torch
        ops (OpenMP gives each its own team), every small op of the other is ~10x slower
        (measured: a 32x384 @ 384x16 matmul pair 23 us on the loading thread, 264 us on another
        thread afterwards), so the engine process loads and serves on one thread."""
        if not on_own_thread:
            return cls(load_base(config.base), config)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        engine = executor.submit(lambda: cls(load_base(config.base), config)).result()
        engine._executor = executor
        return engine

    @property
    def loaded(self) -> bool:
        return True  # constructed from a loaded base

    def wait_loaded(self) -> None:
        """Nothing to wait for: a native engine exists only once its base is loaded."""

    def health(self) -> str | None:
        """None until stopped: a stuck engine thread is seen from outside (`heartbeat`)."""
        return "the engine has stopped" if self._stopped else None

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        """Start the engine thread; with `warmup`, run one short generation first."""
        self._scheduler.start(self._executor)
        self._started = True
        self._accepting = True
        if warmup:
            warm_up(self)

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
        self._stopped = True

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
        validate_request(request, self.config, self.loaded_base.model.config.vocab_size, self.max_context)
        need = len(request.prompt_token_ids) + request.sampling.max_new_tokens
        if need > self._scheduler.kv_token_rows:
            raise ResourceExhausted(f"the request needs KV memory for {need} tokens (prompt + max_new_tokens); this "
                                    f"server's KV cache holds {self._scheduler.kv_token_rows}: send a shorter prompt "
                                    "or fewer max_new_tokens")
        version = None
        if request.adapter:
            with self._lock:
                entry = self._adapters.get(request.adapter)
            if entry is None:
                raise AdapterNotFound(f"adapter {request.adapter!r} is not registered")
            version = entry.version
        request.request_id = request.request_id or uuid.uuid4().hex
        stream = stream or RequestStream(request.request_id, loop)
        detok = IncrementalDetokenizer(self.tokenizer, tuple(request.sampling.stop))
        if not self._scheduler.post(Sequence.create(request, stream, version, detok, self._scheduler.output), self.config.max_queue):
            raise ResourceExhausted(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
        return stream

    def generate(self, prompt: str, adapter: str | None = None, **sampling) -> str:
        """Convenience: one blocking generation, returns the text."""
        request = GenerationRequest(self.encode(prompt), SamplingParams(**sampling), adapter)
        return self.submit(request).result().text

    def cancel(self, stream: RequestStream) -> None:
        stream.cancel()
        self._scheduler.wake()

    # ---- adapters ----------------------------------------------------------------------
    def read_adapter(self, adapter_id: str, path: str | Path,
                     admitted: AdmittedFiles | None = None) -> tuple[LoraWeights, str]:
        """Full validation of an adapter directory against this base: its decoded weights and
        digest, publishing nothing (`admitted`: the config and digest admission established)."""
        check_adapter_ref(adapter_id)
        if admitted is not None:
            config, tensors, digest = read_adapter_dir(path, adapter_id, admitted.config, admitted.digest)
        else:
            config, tensors, digest = read_adapter_dir(path, adapter_id)
        weights = parse_adapter(adapter_id, config, tensors, self._base_shapes, self.config.max_lora_rank,
                                self.loaded_base.dtype, self._expert_shapes)
        return weights, digest

    def check_adapter(self, adapter_id: str, path: str | Path, keep: bool = False,
                      admitted: AdmittedFiles | None = None) -> CheckedAdapter:
        """`read_adapter` as plain data; with `keep`, the decoded weights are kept a little while
        for the `add_adapter` that follows (a check that only validates keeps nothing)."""
        weights, digest = self.read_adapter(adapter_id, path, admitted)
        token = uuid.uuid4().hex
        if keep:
            with self._lock:
                self._checked[token] = weights
                while len(self._checked) > CHECKED_KEPT:
                    self._checked.popitem(last=False)
        return CheckedAdapter(adapter_id, weights.rank, tuple(sorted(weights.modules)), digest, token)

    def add_adapter(self, adapter_id: str, path: str | Path, replace: bool = False,
                    checked: CheckedAdapter | None = None) -> AdapterEntry:
        """Register (or with `replace`, swap) an adapter. Same id and content is a no-op;
        different content without `replace` is ALREADY_EXISTS. Requests already running on the
        old version finish on it; later ones get the new one. `checked` is `check_adapter`'s
        result for these exact bytes when the caller has it (its weights are then reused)."""
        with self._lock:
            reuse = checked is not None and checked.adapter_id == adapter_id
            weights = self._checked.pop(checked.token, None) if reuse else None
        if weights is None:
            weights, digest = self.read_adapter(adapter_id, path)
            if checked is not None and digest != checked.digest:
                raise AdapterIncompatible(f"adapter {adapter_id!r} changed on disk since it was checked")
        else:
            digest = checked.digest
        with self._lock:
            old = self._adapters.get(adapter_id)
            if old is not None and old.digest == digest:
                return old
            if old is not None and not replace:
                raise AdapterAlreadyExists(f"adapter {adapter_id!r} is already registered with different content")
            entry = AdapterEntry(adapter_id, f"{adapter_id}#{next(self._version_counter)}", Path(path), digest,
                                 weights.rank, len(weights.modules))
            self._adapters[adapter_id] = entry
            self._versions[entry.version] = entry
        pinned = old is not None and old.version in self._scheduler.slots.pinned()
        self._on_engine(lambda: self._warm_host(entry.version, weights))
        if old is not None:
            self._retire(old, f"adapter {adapter_id!r} was replaced before the request started; retry")
            if pinned:
                self.pin_adapter(adapter_id)
        return entry

    def remove_adapter(self, adapter_id: str) -> None:
        """New requests for the adapter get NOT_FOUND at once; running ones finish on its
        weights; queued ones that had not started end NOT_FOUND."""
        with self._lock:
            entry = self._adapters.pop(adapter_id, None)
        if entry is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        self._retire(entry, f"adapter {adapter_id!r} was removed before the request started")

    def _retire(self, entry: AdapterEntry, message: str) -> None:
        def drop() -> None:
            self._scheduler.fail_waiting_for(entry.version, message)
            self._scheduler.host.discard(entry.version)
            self._scheduler.slots.drop(entry.version)
            self._scheduler.prefix.drop_version(entry.version)
            with self._lock:
                self._versions.pop(entry.version, None)
        self._on_engine(drop)

    def pin_adapter(self, adapter_id: str) -> None:
        """Keep the adapter in a slot until unpinned (never evicted)."""
        entry = self._entry(adapter_id)
        weights, _ = self.read_adapter(adapter_id, entry.path)

        def pin() -> None:
            self._scheduler.slots.pin(entry.version, weights)
            self._scheduler.host.put(entry.version, weights, keep=self._scheduler.slots.pinned())
        self._on_engine(pin)

    def unpin_adapter(self, adapter_id: str) -> None:
        entry = self._entry(adapter_id)
        self._on_engine(lambda: self._scheduler.slots.unpin(entry.version))

    def preload_adapter(self, adapter_id: str) -> None:
        """Decode an adapter into host memory now, so its first request skips the disk."""
        entry = self._entry(adapter_id)
        weights, _ = self.read_adapter(adapter_id, entry.path)
        self._on_engine(lambda: self._warm_host(entry.version, weights))

    def _warm_host(self, version: str, weights: LoraWeights) -> None:
        """Engine thread: put weights read from disk by a caller into the host tier (a disk load)."""
        self._scheduler.tiers.disk_loads += 1
        self._scheduler.host.put(version, weights, keep=self._scheduler.slots.pinned())

    def has_adapter(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._adapters

    def adapters(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda e: e.adapter_id)

    def adapter_tier(self, adapter_id: str) -> tuple[str, bool]:
        """('gpu' | 'cpu' | 'disk', pinned) for a registered adapter."""
        entry = self._entry(adapter_id)
        slots, host = self._scheduler.slots, self._scheduler.host

        def read() -> tuple[str, bool]:
            tier = "gpu" if entry.version in slots.resident() else "cpu" if entry.version in host.keys() else "disk"
            return tier, entry.version in slots.pinned()
        return self._on_engine(read)

    def _entry(self, adapter_id: str) -> AdapterEntry:
        with self._lock:
            entry = self._adapters.get(adapter_id)
        if entry is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return entry

    def _load_version(self, version: str) -> LoraWeights:
        """Loader thread: read a registered version's files from the store and decode them."""
        with self._lock:
            entry = self._versions.get(version)
        if entry is None:
            raise AdapterNotFound("the adapter was removed before the request started")
        if not entry.path.is_dir():  # another replica removed it from a shared store meanwhile
            raise AdapterNotFound(f"adapter {entry.adapter_id!r} was removed before the request started")
        try:
            weights, digest = self.read_adapter(entry.adapter_id, entry.path)
        except AdapterIncompatible as exc:  # it passed these checks when it was registered
            digest, reason = None, exc.message
        else:
            reason = "their sha256 differs"
        if digest != entry.digest:
            log.error("adapter %s: its stored files no longer match what was registered (%s); not served",
                      entry.adapter_id, reason)
            raise AdapterDataLoss(f"adapter {entry.adapter_id!r}: its stored files no longer match what was "
                                  "registered (changed on disk); the operator must publish it again")
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

    def step_time(self) -> tuple[float, float]:
        """Seconds of decode steps so far (forward, host work after it): the benchmarks' share
        of a step spent outside the model."""
        return self._on_engine(lambda: (self._scheduler.step_time.forward_s, self._scheduler.step_time.host_s))

    def stats(self) -> EngineStats:
        """A consistent snapshot, taken on the engine thread between two steps."""
        return self._on_engine(self._snapshot)

    def _snapshot(self) -> EngineStats:
        s = self._scheduler

        def ids(versions) -> list[str]:
            return sorted(v.rsplit("#", 1)[0] for v in versions)
        return EngineStats(
            waiting=s.num_waiting, running=s.num_running, batch_size=s.last_batch_size,
            slots_resident=ids(s.slots.resident()), slots_in_use=ids(s.slots.in_use()),
            slots_pinned=ids(s.slots.pinned()), host_cached=ids(s.host.keys()),
            host_bytes=s.host.nbytes, slot_loads_total=s.slots.loads_total,
            slot_evictions_total=s.slots.evictions_total, host_evictions_total=s.host.evictions_total,
            gpu_hits_total=s.tiers.gpu_hits, cpu_hits_total=s.tiers.cpu_hits,
            disk_loads_total=s.tiers.disk_loads, disk_load_seconds_total=s.tiers.disk_load_seconds,
            running_adapters=s.running_adapters(), waiting_adapters=s.waiting_adapters(),
            prefix_cache_hits_total=s.prefix.stats.hits, prefix_cache_misses_total=s.prefix.stats.misses,
            prefix_cache_hit_tokens_total=s.prefix.stats.hit_tokens, prefix_cache_bytes=s.prefix.nbytes)
