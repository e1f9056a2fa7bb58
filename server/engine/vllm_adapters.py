"""The vLLM engine's adapters: one vLLM `LoRARequest` (its own integer id) per version of an
adapter, the current version of each adapter id, and the gate that keeps pinned slots safe.

Why a gate: vLLM's scheduler lets up to `max_loras` distinct adapters into one batch, and its
workers make room in the GPU slots by evicting the least recently used adapter that is not
pinned. With p adapters pinned, a batch holding more than `max_loras - p` unpinned adapters
would evict one of its own. So while anything is pinned, requests of an adapter that is not
already inside vLLM wait here until one of the `max_loras - p` unpinned places frees up (first
come, first served, so no adapter starves); with nothing pinned the gate is open and vLLM's
scheduler alone decides.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loraserve.engine.contract import AdapterEntry, CheckedAdapter
from loraserve.errors import AdapterNotFound, ResourceExhausted


@dataclass(eq=False)
class AdapterVersion:
    entry: AdapterEntry
    lora_id: int
    """vLLM's integer id of this version."""
    requests: int = 0
    """Submitted requests on this version that have not ended (waiting here or inside vLLM)."""
    retired: bool = False
    """Replaced or removed: new requests no longer reach it; vLLM drops it when `requests` is 0."""
    pinned: bool = False
    host_bytes: int = 0
    """What vLLM's host cache holds for it."""

    def lora_request(self):
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.entry.version, self.lora_id, str(self.entry.path))


class AdapterVersions:
    """Adapter id -> its current version (read from any thread), and the slot gate (used on the
    engine loop only)."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._lock = threading.Lock()
        self._current: dict[str, AdapterVersion] = {}
        self._lora_ids = itertools.count(1)
        self._numbers = itertools.count(1)
        self._inside: Counter[AdapterVersion] = Counter()  # version -> its requests inside vLLM

    # ---- versions ------------------------------------------------------------------------
    def new_version(self, adapter_id: str, path: str | Path, checked: CheckedAdapter,
                    host_bytes: int) -> AdapterVersion:
        entry = AdapterEntry(adapter_id, f"{adapter_id}#{next(self._numbers)}", Path(path), checked.digest,
                             checked.rank, len(checked.modules))
        return AdapterVersion(entry, next(self._lora_ids), host_bytes=host_bytes)

    def get(self, adapter_id: str) -> AdapterVersion | None:
        with self._lock:
            return self._current.get(adapter_id)

    def require(self, adapter_id: str) -> AdapterVersion:
        version = self.get(adapter_id)
        if version is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return version

    def publish(self, version: AdapterVersion) -> AdapterVersion | None:
        """Make `version` the one new requests get; the version it replaces, if any."""
        with self._lock:
            old = self._current.get(version.entry.adapter_id)
            self._current[version.entry.adapter_id] = version
            return old

    def withdraw(self, adapter_id: str) -> AdapterVersion:
        with self._lock:
            version = self._current.pop(adapter_id, None)
        if version is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return version

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted((v.entry for v in self._current.values()), key=lambda e: e.adapter_id)

    def all(self) -> list[AdapterVersion]:
        with self._lock:
            return list(self._current.values())

    # ---- the slot gate (engine loop) -------------------------------------------------------
    def pinned_count(self) -> int:
        with self._lock:
            return sum(v.pinned for v in self._current.values())

    def open_places(self) -> int:
        """Unpinned adapters that may be inside vLLM at once."""
        return self.max_loras - self.pinned_count()

    def may_enter(self, version: AdapterVersion | None, others_waiting: bool) -> bool:
        """Whether a request on `version` may go into vLLM now (`others_waiting`: earlier
        requests wait at the gate, and a new adapter must not overtake them)."""
        if version is None or version.pinned or version in self._inside or self.pinned_count() == 0:
            return True
        return not others_waiting and len(self._unpinned_inside()) < self.open_places()

    def _unpinned_inside(self) -> list[AdapterVersion]:
        return [v for v in self._inside if not v.pinned]

    def entered(self, version: AdapterVersion | None) -> None:
        if version is not None:
            self._inside[version] += 1

    def left(self, version: AdapterVersion | None) -> None:
        if version is not None and version in self._inside:
            self._inside[version] -= 1
            if self._inside[version] <= 0:
                del self._inside[version]

    def check_pin(self, version: AdapterVersion) -> None:
        """ResourceExhausted unless pinning `version` leaves a slot for everyone else, as with
        the native engine, and room for the unpinned adapters inside vLLM now."""
        if version.pinned:
            return
        pinned = self.pinned_count()
        if pinned + 1 >= self.max_loras:
            raise ResourceExhausted(
                f"cannot pin more than {self.max_loras - 1} adapters with max_loras {self.max_loras}: "
                "one slot must stay available to unpinned adapters")
        others = len([v for v in self._unpinned_inside() if v is not version])
        if others > self.max_loras - pinned - 1:
            raise ResourceExhausted("every adapter slot is in use by running requests; retry the pin shortly")

