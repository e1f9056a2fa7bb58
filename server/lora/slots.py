"""Adapter slots on the accelerator and the host-memory cache behind them.

Both are used from the engine thread only, so they hold no locks. Adapters are identified by
a version that changes when an adapter is replaced, so an old and a new version of one name can be
resident at once (running sequences finish on the weights they started with).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from loraserve.errors import ResourceExhausted
from loraserve.lora.adapter import LoraWeights
from loraserve.lora.expert_layers import ExpertLoraSlots
from loraserve.lora.layers import MultiLoraLinear


class AdapterSlots:
    """`max_loras` slots (1..max_loras; slot 0 is "no adapter") in every wrapped layer (linears,
    and the routed experts' fused parameters).

    An adapter in a slot is held by each running sequence that uses it (`refs`) and by an
    operator pin; only an adapter held by neither can be evicted, least recently used first.
    """

    def __init__(self, layers: dict[str, MultiLoraLinear | ExpertLoraSlots], max_loras: int) -> None:
        self._layers = layers
        self.max_loras = max_loras
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._refs: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._doomed: set[str] = set()  # dropped while held: freed when the last holder ends
        self.loads_total = 0
        self.evictions_total = 0

    def slot_of(self, version: str) -> int | None:
        return self._slot_of.get(version)

    def resident(self) -> list[str]:
        return list(self._slot_of)

    def in_use(self) -> list[str]:
        return [k for k, n in self._refs.items() if n > 0]

    def has_room_for(self, version: str) -> bool:
        """True when `version` is resident or a slot is free or evictable."""
        return version in self._slot_of or len(self._slot_of) < self.max_loras or self._victim() is not None

    def acquire(self, version: str, weights: LoraWeights | None) -> int:
        """Hold `version` for one sequence and return its slot, loading `weights` into a free or
        evicted slot when it is not resident (`weights` may be None only when it is)."""
        slot = self._slot_of.get(version)
        if slot is None:
            slot = self._place(version, weights)
        self._slot_of.move_to_end(version)
        self._refs[version] = self._refs.get(version, 0) + 1
        return slot

    def release(self, version: str) -> None:
        """A sequence that held `version` ended."""
        self._refs[version] -= 1
        if self._refs[version] == 0:
            del self._refs[version]
            if version in self._doomed:
                self._doomed.discard(version)
                self._free(version)

    def pin(self, version: str, weights: LoraWeights | None) -> None:
        """Keep `version` resident until unpinned; at least one slot stays free for everyone else."""
        if version in self._pinned:
            return
        if len(self._pinned) + 1 >= self.max_loras:
            raise ResourceExhausted(
                f"cannot pin more than {self.max_loras - 1} adapters with max_loras {self.max_loras}: "
                "one slot must stay available to unpinned adapters")
        if version not in self._slot_of:
            if not self.has_room_for(version):
                raise ResourceExhausted("every adapter slot is in use by running requests; retry the pin shortly")
            self._place(version, weights)
        self._pinned.add(version)

    def unpin(self, version: str) -> None:
        self._pinned.discard(version)

    def pinned(self) -> set[str]:
        return set(self._pinned)

    def drop(self, version: str) -> None:
        """Forget `version` (its adapter was removed or replaced) as soon as no sequence holds it."""
        self._pinned.discard(version)
        if version not in self._slot_of:
            return
        if self._refs.get(version):
            self._doomed.add(version)
        else:
            self._free(version)

    def _place(self, version: str, weights: LoraWeights | None) -> int:
        if weights is None:
            raise KeyError(f"adapter {version} is not resident and no weights were given")
        used = set(self._slot_of.values())
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = self._victim()
            if victim is None:
                raise ResourceExhausted("no adapter slot is free")
            slot = self._free(victim)
            self.evictions_total += 1
        try:
            for name, layer in self._layers.items():
                module = weights.modules.get(name)
                if module is None:
                    layer.load_slot(slot, None, None, 0.0)
                else:
                    layer.load_slot(slot, module.a, module.b, module.scaling)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            # Routed-expert factors are allocated on load (expert_layers.py): memory can run out
            # here. The slot is left empty and only this adapter's request fails.
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            for layer in self._layers.values():
                layer.clear_slot(slot)
            raise ResourceExhausted(f"adapter {weights.name!r} does not fit in accelerator memory now "
                                    f"({str(exc).splitlines()[0][:160]}); retry later") from None
        self._slot_of[version] = slot
        self.loads_total += 1
        return slot

    def _victim(self) -> str | None:
        for version in self._slot_of:  # oldest first
            if not self._refs.get(version) and version not in self._pinned:
                return version
        return None

    def _free(self, version: str) -> int:
        # Zeroed, not left for the next `_place` to overwrite: a freed slot must hold nothing of
        # an adapter that was removed (its values could be the reason it was removed).
        slot = self._slot_of.pop(version)
        for layer in self._layers.values():
            layer.clear_slot(slot)
        return slot


class HostCache:
    """Decoded adapters in host memory, least recently used evicted past `capacity` adapters or
    `max_bytes`; keys in `keep` (pinned adapters, those queued requests wait for) are never
    evicted."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LoraWeights] = OrderedDict()
        self._nbytes = 0
        self.evictions_total = 0

    def _full(self) -> bool:
        return len(self._items) > self.capacity or (self.max_bytes is not None and self._nbytes > self.max_bytes)

    def has_room(self, nbytes: int = 0) -> bool:
        """Whether one more adapter of `nbytes` fits without evicting anything."""
        return len(self._items) < self.capacity and (self.max_bytes is None or self._nbytes + nbytes <= self.max_bytes)

    def get(self, version: str) -> LoraWeights | None:
        weights = self._items.get(version)
        if weights is not None:
            self._items.move_to_end(version)
        return weights

    def put(self, version: str, weights: LoraWeights, keep: set[str]) -> None:
        self.discard(version)
        self._items[version] = weights
        self._nbytes += weights.nbytes
        while self._full():
            victim = next((k for k in self._items if k not in keep and k != version), None)
            if victim is None:
                break
            self._nbytes -= self._items.pop(victim).nbytes
            self.evictions_total += 1

    def discard(self, version: str) -> None:
        weights = self._items.pop(version, None)
        if weights is not None:
            self._nbytes -= weights.nbytes

    def keys(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._nbytes
