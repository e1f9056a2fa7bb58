"""Adapters by id for the API: the store on disk is the source of truth, the engine serves
what the store holds.

Every register/upload is staged inside the store, admitted (`loraserve.registry.admission`: one
pass of every check) and only then committed: what was checked is exactly what is published,
with no window for the source to change in between. One lock orders commit and engine
registration, so concurrent register/unregister of an adapter never leave the store and the
engine disagreeing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from loraserve.access.principal import DEFAULT_TENANT, TenantLimits
from loraserve.engine.contract import Engine
from loraserve.errors import AdapterIncompatible, AdapterNotFound, InvalidArgument, ResourceExhausted
from loraserve.registry.admission import admit, source_files
from loraserve.rfc3339 import now_utc
from loraserve.store.adapter_store import AdapterStore, StagedAdapter
from loraserve.store.layout import Manifest, split_adapter_id
from loraserve.store.staging import UploadStaging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterStatus:
    manifest: Manifest
    tier: str
    pinned: bool
    shared: bool = False


SUPERSEDED_GRACE_SECONDS = 300.0
"""How long a replaced version stays on disk: longer than any replica's load of it takes, and
than one store sync interval, so no replica reads a version that vanished under it."""


class AdapterRegistry:
    def __init__(self, engine: Engine, settings) -> None:
        self.engine = engine
        self.store = AdapterStore(Path(settings.adapters_dir), max_adapter_bytes=settings.max_adapter_bytes,
                                  max_store_bytes=settings.max_store_bytes or None,
                                  superseded_grace_seconds=SUPERSEDED_GRACE_SECONDS)
        self.roots = [Path(r) for r in settings.import_roots]
        self._lock = threading.Lock()
        for problem in self.store.problems:
            log.error("adapter store: %s: %s (not served)", problem.adapter_id, problem.message)

    # ---- start-up ----------------------------------------------------------------------
    def load_store(self, preload: list[str], pin: list[str]) -> None:
        """Serve every stored adapter built for this base; warm and pin as configured."""
        for manifest in self.store.list():
            if manifest.base_fingerprint != self.engine.base.fingerprint:
                log.error("adapter %s was built for base %s, not the served base %s: not served", manifest.adapter_id,
                          manifest.base_fingerprint[:19], self.engine.base.fingerprint[:19])
                continue
            try:
                self.engine.add_adapter(manifest.adapter_id, self.store.path_of(manifest.adapter_id))
            except Exception as exc:  # one bad stored adapter must not keep the server from starting
                log.error("adapter %s in the store cannot be served: %s", manifest.adapter_id, exc)
        # Settings may name adapters of the open server's tenant without it.
        pin, preload = ([n if "/" in n else f"{DEFAULT_TENANT}/{n}" for n in names] for names in (pin, preload))
        for adapter_id in pin:
            self.engine.pin_adapter(adapter_id)
        for adapter_id in preload:
            if adapter_id not in pin:
                self.engine.preload_adapter(adapter_id)

    # ---- what other processes changed in a shared store ---------------------------------------
    def sync(self) -> list[str]:
        """Serve what other replicas or training jobs published, replaced or removed in the
        store since the last look; the ids that changed."""
        changed = self.store.refresh()
        for adapter_id in changed:
            with self._lock:
                self._follow_store(adapter_id)
        if changed:
            log.info("adapter store sync: %s changed", ", ".join(changed))
        return changed

    def ensure(self, adapter_id: str) -> bool:
        """On a request for an adapter this process does not serve: look in the store (another
        process may just have published it) and serve it if it is there; whether it is served."""
        if self.engine.has_adapter(adapter_id):
            return True
        try:
            self.store.refresh_one(adapter_id)
        except InvalidArgument:
            return False
        with self._lock:
            self._follow_store(adapter_id)
        return self.engine.has_adapter(adapter_id)

    def _follow_store(self, adapter_id: str) -> None:
        """Make the engine serve what the store holds under `adapter_id` (held: self._lock)."""
        try:
            manifest = self.store.get(adapter_id)
        except AdapterNotFound:
            if self.engine.has_adapter(adapter_id):
                self.engine.remove_adapter(adapter_id)
                log.warning("adapter %s was removed from the store by another process", adapter_id)
            return
        if manifest.base_fingerprint != self.engine.base.fingerprint:
            log.error("adapter %s in the store was built for another base: not served", adapter_id)
            return
        path = self.store.path_of(adapter_id)
        try:
            checked = self.engine.check_adapter(adapter_id, path, keep=True)
            if checked.digest != manifest.digest:
                raise AdapterIncompatible("its files do not match the sha256 in its manifest")
            self.engine.add_adapter(adapter_id, path, replace=True, checked=checked)
        except Exception as exc:  # a bad adapter from elsewhere must not break this replica
            log.error("adapter %s in the store cannot be served: %s", adapter_id, exc)
            return
        log.warning("serving adapter %s (%s) published by another process", adapter_id, manifest.source)

    # ---- checks ------------------------------------------------------------------------
    def validate(self, adapter_id: str, path: str) -> Manifest:
        """The manifest the adapter would get; publishes nothing."""
        with self.store.stage(adapter_id, self._source_files(adapter_id, path)) as staged:
            checked = admit(staged, self.engine, keep=False)
            return Manifest(adapter_id=adapter_id, files=staged.files, r=checked.r, lora_alpha=checked.lora_alpha,
                            target_modules=checked.target_modules, base_fingerprint=self.engine.base.fingerprint,
                            size_bytes=staged.size_bytes, created_time=now_utc(), source="register")

    # ---- changes -----------------------------------------------------------------------
    def _source_files(self, adapter_id: str, path: str) -> dict[str, Path]:
        return source_files(adapter_id, path, self.roots, self.engine.base.fingerprint)

    def register(self, adapter_id: str, path: str, replace: bool,
                 limits: TenantLimits | None = None) -> tuple[AdapterStatus, bool]:
        """Publish the directory `path` (under an import root) as `adapter_id` ('<tenant>/<name>'),
        within the tenant's `limits`."""
        return self._publish((adapter_id, self._source_files(adapter_id, path)), replace, "register", limits)

    def open_upload(self, adapter_id: str) -> UploadStaging:
        """Where an upload for adapter id `adapter_id` writes its chunks as they arrive."""
        return self.store.open_upload(adapter_id)

    def upload(self, upload: UploadStaging, replace: bool,
               limits: TenantLimits | None = None) -> tuple[AdapterStatus, bool]:
        """Publish a finished upload (its files are checked here, then committed)."""
        return self._publish(upload.finish(), replace, "upload", limits)

    def _publish(self, staged: StagedAdapter | tuple[str, dict], replace: bool, source: str,
                 limits: TenantLimits | None) -> tuple[AdapterStatus, bool]:
        """Check and commit a staged adapter (or stage (adapter_id, files) first), then serve it."""
        if isinstance(staged, tuple):
            staged = self.store.stage(*staged)
        adapter_id = staged.adapter_id
        with staged:
            checked = admit(staged, self.engine, keep=True)
            with self._lock:
                self._check_quota(adapter_id, staged.size_bytes, limits or TenantLimits())
                manifest, created = self.store.commit(
                    staged, r=checked.r, lora_alpha=checked.lora_alpha, target_modules=checked.target_modules,
                    base_fingerprint=self.engine.base.fingerprint, source=source, replace=replace)
                if created or not self.engine.has_adapter(adapter_id):
                    # The committed files are the staged bytes that were just decoded.
                    self.engine.add_adapter(adapter_id, self.store.path_of(adapter_id), replace=True, checked=checked.adapter)
        return self.status(adapter_id, manifest), created

    def _check_quota(self, adapter_id: str, size_bytes: int, limits: TenantLimits) -> None:
        """The tenant's adapter count and store bytes after this publish stay within its limits
        (another replica publishing at the same moment can overshoot by its one adapter)."""
        tenant, _ = split_adapter_id(adapter_id)
        self.store.refresh_one(adapter_id)
        count, used = self.store.tenant_usage(tenant)
        try:
            old, count_after = self.store.get(adapter_id).size_bytes, count
        except AdapterNotFound:
            old, count_after = 0, count + 1
        if limits.max_adapters is not None and count_after > limits.max_adapters:
            raise ResourceExhausted(f"tenant {tenant!r} has {count} adapters, its limit is {limits.max_adapters}; "
                                    "remove one first")
        if limits.max_store_bytes is not None and used - old + size_bytes > limits.max_store_bytes:
            raise ResourceExhausted(f"adapter {adapter_id!r} would bring tenant {tenant!r} to {used - old + size_bytes:,} "
                                    f"bytes, over its limit of {limits.max_store_bytes:,}")

    def share(self, adapter_id: str, shared: bool) -> AdapterStatus:
        """Let every tenant use the adapter (or stop that)."""
        self.store.set_shared(adapter_id, shared)
        return self.status(adapter_id)

    def unregister(self, adapter_id: str) -> None:
        """Stop serving the adapter, then delete it from the store. In that order: requests
        queued for it end NOT_FOUND in the engine before its files go, so none of them can try to
        read files that are no longer there."""
        with self._lock:
            try:
                self.engine.remove_adapter(adapter_id)
            except AdapterNotFound:  # stored but never served (e.g. built for another base)
                pass
            self.store.remove(adapter_id)

    # ---- reads -------------------------------------------------------------------------
    def status(self, adapter_id: str, manifest: Manifest | None = None) -> AdapterStatus:
        manifest = manifest or self.store.get(adapter_id)
        try:
            tier, pinned = self.engine.adapter_tier(adapter_id)
        except AdapterNotFound:
            tier, pinned = "disk", False
        return AdapterStatus(manifest, tier, pinned, self.store.is_shared(adapter_id))

    def list(self) -> list[AdapterStatus]:
        return [self.status(m.adapter_id, m) for m in self.store.list() if self.engine.has_adapter(m.adapter_id)]

    def get(self, adapter_id: str) -> AdapterStatus:
        if not self.engine.has_adapter(adapter_id):
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return self.status(adapter_id)

    def pin(self, adapter_id: str) -> None:
        self.engine.pin_adapter(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.engine.unpin_adapter(adapter_id)
