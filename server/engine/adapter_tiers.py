"""Where the native engine finds an adapter for a request: a slot on the accelerator, the host
cache behind the slots (bounded in adapters and bytes), or the store on disk, read by a loader
thread so decode steps go on meanwhile. Engine thread only, except the loader's own work."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loraserve.engine.sequence import Sequence
from loraserve.errors import LoraserveError
from loraserve.lora.adapter import LoraWeights
from loraserve.lora.slots import AdapterSlots, HostCache

log = logging.getLogger(__name__)

WeightsLoader = Callable[[str], LoraWeights]
"""Reads and decodes the adapter version `version` from the store (runs on a loader thread)."""

PREFETCH_READS = 2
"""Disk reads in flight at most for queued requests' adapters."""


def auto_host_bytes() -> int:
    """The host cache's size when not configured: an eighth of the host's RAM."""
    import psutil

    return psutil.virtual_memory().total // 8


@dataclass
class TierCounters:
    """Where adapter lookups were served from, and loads between tiers."""

    gpu_hits: int = 0
    cpu_hits: int = 0
    disk_loads: int = 0
    disk_load_seconds: float = 0.0


class AdapterTiers:
    def __init__(self, slots: AdapterSlots, host: HostCache, loader: WeightsLoader,
                 on_loaded: Callable[[str, LoraWeights | None, LoraserveError | None, float], None]) -> None:
        """`on_loaded(version, weights, error, seconds)` is called on the loader thread when a
        read ends; the engine thread then calls `loaded` with the same values."""
        self.slots = slots
        self.host = host
        self.counters = TierCounters()
        self.load_observers: list[Callable[[float], None]] = []
        """Called (on the engine thread) with the seconds each disk load took."""
        self._loader = loader
        self._on_loaded = on_loaded
        self._loading: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    def ready(self, seq: Sequence, step: int) -> bool:
        """True when the sequence's adapter is in a slot or can be put in one now; otherwise
        starts reading it from disk or notes (at `step`) that the sequence waits for a slot."""
        version = seq.adapter_version
        if version is None:
            return True
        if self.slots.slot_of(version) is not None:
            self.counters.gpu_hits += 1
            return True
        if self.host.get(version) is None:
            # Read from disk only when the weights could be used soon or fit without evicting
            # another waiting adapter's; otherwise loads would evict each other while every
            # slot is busy and the loader would re-read the same files over and over.
            if self.slots.has_room_for(version) or self.host.has_room():
                self.start_load(version)
            return False
        if not self.slots.has_room_for(version):
            if seq.blocked_since_step is None:
                seq.blocked_since_step = step
            return False
        self.counters.cpu_hits += 1
        return True

    def prefetch(self, waiting: Iterable[Sequence]) -> None:
        """Start reading the adapters of queued requests into host memory before their turn,
        while the host cache holds them without evicting anything."""
        for seq in waiting:
            if len(self._loading) >= PREFETCH_READS or not self.host.has_room():
                return
            version = seq.adapter_version
            if version is not None and version not in self._loading and self.host.get(version) is None \
                    and self.slots.slot_of(version) is None:
                self.start_load(version)

    def is_available(self, version: str | None) -> bool:
        return version is None or self.host.get(version) is not None or self.slots.slot_of(version) is not None

    def start_load(self, version: str) -> None:
        if version in self._loading:
            return
        self._loading.add(version)

        def work() -> None:
            started = time.monotonic()
            try:
                weights, error = self._loader(version), None
            except LoraserveError as exc:
                weights, error = None, exc
            except Exception as exc:  # a server fault while reading: log it, fail those requests
                log.exception("loading adapter %s failed", version)
                weights, error = None, LoraserveError(f"could not load the adapter ({type(exc).__name__})")
            self._on_loaded(version, weights, error, time.monotonic() - started)

        self._pool.submit(work)

    def loaded(self, version: str, weights: LoraWeights | None, seconds: float, keep: set[str]) -> None:
        """Engine thread: a read has ended (weights None: it failed, the caller fails its requests)."""
        self._loading.discard(version)
        if weights is None:
            return
        self.counters.disk_loads += 1
        self.counters.disk_load_seconds += seconds
        for observe in self.load_observers:
            observe(seconds)
        self.host.put(version, weights, keep=keep)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
