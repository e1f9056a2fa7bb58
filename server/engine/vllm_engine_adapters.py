"""The adapter half of the vLLM engine (`VllmEngine` inherits it): loraserve's checks of an
adapter, its versions as vLLM `LoRARequest`s (register preloads, replace switches new requests
to the new version while running ones finish on the old, unregister removes it once its
requests finish), vLLM's pin, and what vLLM's workers report about their adapter caches.

Every coroutine here runs on the engine loop (see `loraserve.engine.vllm_engine`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from loraserve.engine.contract import AdapterEntry, AdmittedFiles, CheckedAdapter, EngineStats
from loraserve.engine.vllm_adapters import AdapterVersion
from loraserve.engine.vllm_setup import BaseModelFacts
from loraserve.errors import AdapterAlreadyExists, AdapterIncompatible, AdapterNotFound, Unavailable
from loraserve.lora.adapter import parse_adapter
from loraserve.store.peft_files import read_adapter_dir


class VllmAdapterMethods:
    """The contract's adapter methods and `stats`, for `VllmEngine`."""

    # ---- adapters ----------------------------------------------------------------------
    def check_adapter(self, adapter_id: str, path: str | Path, keep: bool = False,
                      admitted: AdmittedFiles | None = None) -> CheckedAdapter:
        """The same checks as the native engine's, against this base's module shapes and
        compute dtype; vLLM's workers then read the files themselves, so nothing is kept."""
        config, digest = (admitted.config, admitted.digest) if admitted is not None else (None, None)
        config, tensors, digest = read_adapter_dir(path, adapter_id, config, digest)
        weights = parse_adapter(adapter_id, config, tensors, self._facts.lora_module_shapes,
                                self.config.max_lora_rank, self._facts.dtype)
        return CheckedAdapter(adapter_id, weights.rank, tuple(sorted(weights.modules)), digest, uuid.uuid4().hex)

    def add_adapter(self, adapter_id: str, path: str | Path, replace: bool = False,
                    checked: CheckedAdapter | None = None) -> AdapterEntry:
        """Register (or with `replace`, swap) an adapter, loaded into vLLM before it is
        published; requests running on the old version finish on it."""
        if checked is None or checked.adapter_id != adapter_id:
            checked = self.check_adapter(adapter_id, path)
        old = self._versions.get(adapter_id)
        if old is not None and old.entry.digest == checked.digest:
            return old.entry
        if old is not None and not replace:
            raise AdapterAlreadyExists(f"adapter {adapter_id!r} is already registered with different content")
        version = self._versions.new_version(adapter_id, path, checked, _host_bytes(checked, self._facts))
        self._run(self._load(version))
        self._versions.publish(version)
        if old is not None:
            self._run(self._retire(old, f"adapter {adapter_id!r} was replaced before the request started; retry"))
            if old.pinned:
                self.pin_adapter(adapter_id)
        return version.entry

    async def _load(self, version: AdapterVersion) -> None:
        """Engine loop: have vLLM read the version into its caches (again, if it evicted it)."""
        try:
            await self._llm.add_lora(version.lora_request())
        except Exception as exc:  # noqa: BLE001 - vLLM could not read or place it
            raise AdapterIncompatible(f"adapter {version.entry.adapter_id!r}: vLLM cannot serve it ({exc})") from None
        self._lora_ids[version.lora_id] = version

    def remove_adapter(self, adapter_id: str) -> None:
        version = self._versions.withdraw(adapter_id)
        self._run(self._retire(version, f"adapter {adapter_id!r} was removed before the request started"))

    async def _retire(self, version: AdapterVersion, message: str) -> None:
        """Engine loop: its requests with no token yet end NOT_FOUND, the others finish, and
        the last one out drops it from vLLM."""
        version.retired = True
        if version.pinned:
            await self._unpin(version)
        for request in list(self._requests.values()):
            if request.version is version and not request.seq.output_ids:
                self._end(request, AdapterNotFound(message))
        if version.requests == 0:
            await self._drop_from_vllm(version)

    async def _drop_from_vllm(self, version: AdapterVersion) -> None:
        if self._lora_ids.pop(version.lora_id, None) is not None and not self._llm.errored:
            await self._llm.remove_lora(version.lora_id)

    def pin_adapter(self, adapter_id: str) -> None:
        """vLLM's pin (its GPU slot and host copy are never evicted), with a slot left for
        everyone else as with the native engine."""
        self._run(self._pin(self._versions.require(adapter_id)))

    async def _pin(self, version: AdapterVersion) -> None:
        self._versions.check_pin(version)
        if version.pinned:
            return
        await self._load(version)  # vLLM pins only what its host cache holds
        await self._llm.pin_lora(version.lora_id)
        version.pinned = True

    def unpin_adapter(self, adapter_id: str) -> None:
        self._run(self._unpin(self._versions.require(adapter_id)))

    async def _unpin(self, version: AdapterVersion) -> None:
        if version.pinned:
            await self._llm.collective_rpc("loraserve_unpin", args=(version.lora_id,))
            version.pinned = False
            self._admit_held()

    def preload_adapter(self, adapter_id: str) -> None:
        self._run(self._load(self._versions.require(adapter_id)))

    def adapter_tier(self, adapter_id: str) -> tuple[str, bool]:
        """Where vLLM's workers hold the adapter now: 'gpu' (a LoRA slot), 'cpu' (their host
        cache) or 'disk'."""
        version = self._versions.require(adapter_id)
        caches = self._run(self._caches())
        tier = "gpu" if version.lora_id in caches["gpu"] else "cpu" if version.lora_id in caches["cpu"] else "disk"
        return tier, version.pinned

    def has_adapter(self, adapter_id: str) -> bool:
        return self._versions.get(adapter_id) is not None

    def adapters(self) -> list[AdapterEntry]:
        return self._versions.entries()

    # ---- observability -----------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Requests from loraserve's side; adapter tiers and counters from vLLM's workers."""
        if not self.loaded:
            raise Unavailable("the engine is still loading its base")
        return self._run(self._snapshot())

    async def _caches(self) -> dict:
        """vLLM's adapter caches, from its first worker (every worker holds the same adapters)."""
        return (await self._llm.collective_rpc("loraserve_lora_caches"))[0]

    async def _snapshot(self) -> EngineStats:
        caches = await self._caches()
        counts = caches["counts"]

        def ids(lora_ids) -> list[str]:
            return sorted({self._lora_ids[i].entry.adapter_id for i in lora_ids if i in self._lora_ids})
        inside = [r for r in self._requests.values() if r.task is not None]
        running = [r for r in inside if r.seq.output_ids]
        host = [self._lora_ids[i] for i in caches["cpu"] if i in self._lora_ids]
        return EngineStats(
            waiting=len(self._requests) - len(running), running=len(running), batch_size=len(running),
            slots_resident=ids(caches["gpu"]), slots_in_use=sorted({r.version.entry.adapter_id for r in running
                                                                     if r.version is not None}),
            slots_pinned=ids(caches["pinned"]), host_cached=ids(caches["cpu"]),
            host_bytes=sum(v.host_bytes for v in host),
            slot_loads_total=counts.get("slot_loads", 0), slot_evictions_total=counts.get("slot_evictions", 0),
            host_evictions_total=counts.get("host_evictions", 0), gpu_hits_total=counts.get("gpu_hits", 0),
            cpu_hits_total=counts.get("cpu_hits", 0), disk_loads_total=counts.get("disk_loads", 0),
            disk_load_seconds_total=counts.get("disk_load_us", 0) / 1e6,
            running_adapters=sorted({r.seq.request.adapter for r in running if r.seq.request.adapter}),
            waiting_adapters=sorted({r.seq.request.adapter for r in self._requests.values()
                                     if r not in running and r.seq.request.adapter}))


def _host_bytes(checked: CheckedAdapter, facts: BaseModelFacts) -> int:
    """What vLLM's host cache holds for an adapter: A [r, in] and B [out, r] of every module in
    the compute dtype (at its largest rank, where a rank_pattern lowers some)."""
    itemsize = facts.dtype.itemsize
    return sum(checked.rank * sum(facts.lora_module_shapes.get(m, (0, 0))) * itemsize for m in checked.modules)
