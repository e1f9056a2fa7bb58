"""The adapter store: the adapters on disk that the server serves, and the source of truth for
which ones exist (what is published survives a restart). Layout and atomicity: `layout.py`.

Publishing is two steps so that what is validated is exactly what is served:
`stage()` copies the files into the store's private staging area (hashing them, checking
sizes and the safetensors header), the caller validates the staged copy against the base
(`Engine.check_adapter(adapter_id, staged.path)`), and `commit()` records the manifest and swaps
the version in. `publish()` does both for callers that have already validated.

The store knows nothing of slots, engines or gRPC. It is thread-safe (one lock around every
change of the index; copying and hashing run outside it), and several processes may share a
store directory (replicas on a shared volume, a training job): each change takes an
exclusive flock on `<root>/.lock` for the few renames of its commit, reads what is on disk
under it, and `refresh()` picks up what other processes changed. See `layout.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from loraserve.errors import (
    AdapterAlreadyExists,
    AdapterNotFound,
    ConfigError,
    ResourceExhausted,
)
from loraserve.rfc3339 import now_utc
from loraserve.store.layout import (
    ADAPTER_NAME,
    CURRENT_LINK,
    LOCK_FILE,
    MANIFEST_FILE,
    SHARED_MARKER,
    TMP_PREFIX,
    Manifest,
    fsync_dir,
    new_tmp_name,
    new_version_name,
    split_adapter_id,
    store_full_is_resource_exhausted,
    swap_symlink,
    tmp_is_leftover,
    verify_version,
    write_durably,
)
from loraserve.store.staging import StagedAdapter, UploadStaging, stage_files
from loraserve.store.versions import has_old_versions, link_target, prune_versions, read_current, remove_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreProblem:
    """An adapter found at start-up that is not served, and why (for logs and operators)."""

    adapter_id: str
    message: str


class AdapterStore:
    """Published adapters under `root`, each a PEFT directory plus manifest.json.

    `max_adapter_bytes` bounds one adapter (both files); `max_store_bytes` (None = no limit)
    bounds the sum over published adapters. Opening recovers from any crash: leftovers are
    deleted and every manifest is re-verified against its files (sha256 and size); an adapter
    that fails is listed in `problems` and not served. A replaced version is deleted once it
    has been superseded for `superseded_grace_seconds` (servers sharing the store set a grace,
    so a replica still loading the old version is not cut off)."""

    def __init__(self, root: str | Path, max_adapter_bytes: int, max_store_bytes: int | None = None,
                 superseded_grace_seconds: float = 0.0) -> None:
        if isinstance(max_adapter_bytes, bool) or not isinstance(max_adapter_bytes, int) or max_adapter_bytes < 1:
            raise ConfigError(f"max_adapter_bytes must be a positive integer, got {max_adapter_bytes!r}")
        if max_store_bytes is not None and (not isinstance(max_store_bytes, int) or max_store_bytes < 1):
            raise ConfigError(f"max_store_bytes must be a positive integer or None, got {max_store_bytes!r}")
        self.root = Path(root).absolute()
        self.max_adapter_bytes = max_adapter_bytes
        self.max_store_bytes = max_store_bytes
        self.superseded_grace_seconds = superseded_grace_seconds
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError("the adapter store path exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: dict[str, Manifest] = {}
        self._paths: dict[str, Path] = {}  # adapter_id -> its current version directory
        self._problems: dict[str, StoreProblem] = {}
        self._bad_versions: dict[str, str] = {}  # adapter_id -> the version found broken at start-up
        self._shared: set[str] = set()  # adapters an admin shared with every tenant
        with self._lock, self._writer():
            self._recover()

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """Exclusive across processes: held while `current` links change or leftovers are
        deleted, so a writer never deletes what another is committing."""
        with open(self.root / LOCK_FILE, "ab") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def close(self) -> None:
        """Nothing is held between calls; kept so a store can be used as a context manager."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading -----------------------------------------------------------------------
    @property
    def problems(self) -> list[StoreProblem]:
        """Adapters on disk that are not served (found broken at start-up), by id."""
        with self._lock:
            return sorted(self._problems.values(), key=lambda p: p.adapter_id)

    def list(self) -> list[Manifest]:
        """Every served adapter's manifest, by id."""
        with self._lock:
            return [self._index[adapter_id] for adapter_id in sorted(self._index)]

    def get(self, adapter_id: str) -> Manifest:
        split_adapter_id(adapter_id)
        with self._lock:
            if adapter_id not in self._index:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            return self._index[adapter_id]

    def path_of(self, adapter_id: str) -> Path:
        """The current version's directory (a PEFT directory, readable by `read_adapter_dir`).
        It names that version, not `current`, so it never changes under a reader; a replace
        or remove deletes it once it is superseded."""
        split_adapter_id(adapter_id)
        with self._lock:
            if adapter_id not in self._paths:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            return self._paths[adapter_id]

    def total_bytes(self) -> int:
        """Bytes of adapter files over every served adapter (what `max_store_bytes` bounds)."""
        with self._lock:
            return sum(m.size_bytes for m in self._index.values())

    # ---- publishing --------------------------------------------------------------------
    def stage(self, adapter_id: str, files: Mapping[str, bytes | Path]) -> StagedAdapter:
        """Copy an adapter's files into the staging area, checked (see `stage_files`)."""
        return stage_files(self.root, adapter_id, files, self.max_adapter_bytes)

    def open_upload(self, adapter_id: str) -> UploadStaging:
        """A staging area an upload writes into chunk by chunk (see `UploadStaging`)."""
        return UploadStaging(self.root, adapter_id, self.max_adapter_bytes)

    def commit(self, staged: StagedAdapter, *, r: int, lora_alpha: float, target_modules: Sequence[str],
               base_fingerprint: str, source: str, replace: bool = False,
               training: dict | None = None) -> tuple[Manifest, bool]:
        """Publish a staged adapter: (its manifest, True), or (the existing manifest, False)
        when the id already holds the same content. Different content under the id is
        AdapterAlreadyExists unless `replace`; going over `max_store_bytes` is
        ResourceExhausted. The staged files are consumed either way."""
        if staged.done:
            raise ValueError("this staged adapter was already committed or discarded")
        try:
            manifest = Manifest(adapter_id=staged.adapter_id, files=staged.files, r=r, lora_alpha=float(lora_alpha),
                                target_modules=tuple(target_modules), base_fingerprint=base_fingerprint,
                                size_bytes=staged.size_bytes, created_time=now_utc(), source=source,
                                training=training)
            with store_full_is_resource_exhausted():
                write_durably(staged.path / MANIFEST_FILE, manifest.to_json())
                fsync_dir(staged.path)
                with self._lock, self._writer():
                    self._sync_one(staged.adapter_id)
                    if self.max_store_bytes is not None:
                        self._sync_all()
                    return self._commit_locked(staged, manifest, replace)
        finally:
            staged.discard()

    def publish(self, adapter_id: str, files: Mapping[str, bytes | Path], *, r: int, lora_alpha: float,
                target_modules: Sequence[str], base_fingerprint: str, source: str,
                replace: bool = False, training: dict | None = None) -> tuple[Manifest, bool]:
        """`stage` then `commit`, for files the caller has already validated."""
        with self.stage(adapter_id, files) as staged:
            return self.commit(staged, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                               base_fingerprint=base_fingerprint, source=source, replace=replace,
                               training=training)

    def _commit_locked(self, staged: StagedAdapter, manifest: Manifest, replace: bool) -> tuple[Manifest, bool]:
        adapter_id = manifest.adapter_id
        old = self._index.get(adapter_id)
        if old is not None and old.digest == manifest.digest:
            return old, False
        if old is not None and not replace:
            raise AdapterAlreadyExists(f"adapter {adapter_id!r} is already registered with different content; "
                                       "set replace to swap it")
        if self.max_store_bytes is not None:
            total = sum(m.size_bytes for m in self._index.values()) - (old.size_bytes if old else 0)
            total += manifest.size_bytes
            if total > self.max_store_bytes:
                raise ResourceExhausted(f"adapter {adapter_id!r} would bring the store to {total:,} bytes, over its "
                                        f"limit of {self.max_store_bytes:,}; remove adapters first")
        name_dir = self.root / adapter_id
        if not name_dir.parent.is_dir():
            os.mkdir(name_dir.parent)
            fsync_dir(self.root)
        if not name_dir.is_dir():
            os.mkdir(name_dir)
            fsync_dir(name_dir.parent)
        version = new_version_name(manifest.digest)
        os.rename(staged.path, name_dir / version)
        staged.done = True
        try:
            fsync_dir(name_dir)
            swap_symlink(name_dir / CURRENT_LINK, version)  # the commit point
        except BaseException:
            if link_target(name_dir) != version:
                shutil.rmtree(name_dir / version, ignore_errors=True)
                raise
            self._record(adapter_id, manifest, name_dir / version)  # swapped; only its fsync failed
            raise
        self._record(adapter_id, manifest, name_dir / version)
        return manifest, True

    def _record(self, adapter_id: str, manifest: Manifest, version_dir: Path) -> None:
        """Index the new current version and delete the versions it supersedes (past the grace)."""
        self._index[adapter_id] = manifest
        self._paths[adapter_id] = version_dir
        self._problems.pop(adapter_id, None)
        self._bad_versions.pop(adapter_id, None)
        prune_versions(version_dir.parent, self.superseded_grace_seconds)

    # ---- sharing and per-tenant usage -------------------------------------------------------
    def is_shared(self, adapter_id: str) -> bool:
        """Whether an admin shared this adapter with every tenant."""
        with self._lock:
            return adapter_id in self._shared

    def set_shared(self, adapter_id: str, shared: bool) -> None:
        """Share an adapter with every tenant, or stop sharing it (a marker file next to
        `current`, so every replica sees it; a replace keeps it, a remove drops it)."""
        split_adapter_id(adapter_id)
        with self._lock, self._writer():
            self._sync_one(adapter_id)
            if adapter_id not in self._index:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            marker = self.root / adapter_id / SHARED_MARKER
            if shared and not os.path.lexists(marker):
                write_durably(marker, b"")
            elif not shared and os.path.lexists(marker):
                marker.unlink()
            fsync_dir(marker.parent)
            (self._shared.add if shared else self._shared.discard)(adapter_id)

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """(adapters, bytes) the tenant has in the store, as last seen (for its quotas)."""
        with self._lock:
            mine = [m for key, m in self._index.items() if key.split("/")[0] == tenant]
            return len(mine), sum(m.size_bytes for m in mine)

    # ---- what other processes changed -------------------------------------------------------
    def refresh(self) -> list[str]:
        """Re-read which version of each adapter is current on disk: the names another process
        published, replaced or removed since this one last looked, by id. Superseded
        versions past their grace are deleted on the way."""
        with self._lock:
            changed = self._sync_all()
            stale = [self.root / n for n in self._paths if has_old_versions(self.root / n, self.superseded_grace_seconds)]
        if stale:
            with self._lock, self._writer():
                for name_dir in stale:
                    prune_versions(name_dir, self.superseded_grace_seconds)
        return changed

    def refresh_one(self, adapter_id: str) -> bool:
        """`refresh` for one adapter (a cache miss): whether it changed."""
        split_adapter_id(adapter_id)
        with self._lock:
            return self._sync_one(adapter_id)

    def _sync_all(self) -> list[str]:
        on_disk = {f"{tenant}/{name}" for tenant, name in _adapter_dirs(self.root)}
        return [adapter_id for adapter_id in sorted(on_disk | set(self._index)) if self._sync_one(adapter_id)]

    def _sync_one(self, adapter_id: str) -> bool:
        """Make the index entry for `adapter_id` match the disk; whether it changed. Another
        process's version is checked against its manifest by file names and sizes (the full sha256
        check happens where the weights are read: the engine's digest must equal it)."""
        version = read_current(self.root / adapter_id)
        known = self._paths.get(adapter_id)
        if version is None:
            if known is None:
                return False
            del self._index[adapter_id], self._paths[adapter_id]
            self._shared.discard(adapter_id)
            return True
        shared = os.path.lexists(self.root / adapter_id / SHARED_MARKER)
        if shared != (adapter_id in self._shared):
            (self._shared.add if shared else self._shared.discard)(adapter_id)
            if known is not None and known.name == version:
                return True
        if (known is not None and known.name == version) or self._bad_versions.get(adapter_id) == version:
            return False
        try:
            manifest = verify_version(adapter_id, self.root / adapter_id / version, hashes=False)
        except (ValueError, OSError) as exc:  # superseded while reading it: the next look sees the new one
            log.warning("adapter store: adapter %s, version %s: %s", adapter_id, version, exc)
            return False
        self._index[adapter_id] = manifest
        self._paths[adapter_id] = self.root / adapter_id / version
        self._problems.pop(adapter_id, None)
        return True

    def remove(self, adapter_id: str) -> None:
        """Delete an adapter (served, or broken at start-up); AdapterNotFound if neither."""
        split_adapter_id(adapter_id)
        with self._lock, self._writer():
            self._sync_one(adapter_id)
            if adapter_id not in self._index and adapter_id not in self._problems:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            # One rename takes the whole adapter out of the store atomically; the slow delete
            # happens after, and a crash during it leaves a `.tmp-*` that start-up deletes.
            tomb: Path | None = self.root / new_tmp_name("removed")
            try:
                os.rename(self.root / adapter_id, tomb)
            except FileNotFoundError:  # reported lost at start-up: nothing left on disk
                tomb = None
            self._index.pop(adapter_id, None)
            self._paths.pop(adapter_id, None)
            self._problems.pop(adapter_id, None)
            self._shared.discard(adapter_id)
            fsync_dir(self.root)
        if tomb is not None:
            remove_path(tomb)

    # ---- start-up recovery -------------------------------------------------------------
    def _recover(self) -> None:
        """Delete what dead writers left, then verify every current version in full."""
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith(TMP_PREFIX):
                if tmp_is_leftover(path):
                    log.info("adapter store: deleting %s, left by an unfinished write", entry.name)
                    remove_path(path)
            elif ADAPTER_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                for child in sorted(os.scandir(path), key=lambda e: e.name):
                    if ADAPTER_NAME.fullmatch(child.name) and child.is_dir(follow_symlinks=False):
                        self._recover_adapter(f"{entry.name}/{child.name}", Path(child.path))
                    else:
                        log.warning("adapter store: ignoring %s/%s, which is not an adapter directory",
                                    entry.name, child.name)
            elif not entry.name.startswith("."):  # .lock, trainers' .checkpoints: ours, not adapters
                log.warning("adapter store: ignoring %r, which is not an adapter directory", entry.name)
        fsync_dir(self.root)
        log.info("adapter store: %d adapters served, %d not served", len(self._index), len(self._problems))

    def _recover_adapter(self, adapter_id: str, name_dir: Path) -> None:
        """Keep `current` and the version it names; delete what is left over; verify it."""
        had_link = os.path.lexists(name_dir / CURRENT_LINK)
        version = read_current(name_dir)
        if version is None:
            remove_path(name_dir)  # without `current` it was a first publish that never finished
            if had_link:
                self._report(adapter_id, f"adapter {adapter_id!r} was lost: its current version is missing")
            return
        prune_versions(name_dir, self.superseded_grace_seconds)
        try:
            manifest = verify_version(adapter_id, name_dir / version)
        except ValueError as exc:
            self._bad_versions[adapter_id] = version
            self._report(adapter_id, f"adapter {adapter_id!r} is not served: {exc}; publish it again or remove it")
            return
        self._index[adapter_id] = manifest
        self._paths[adapter_id] = name_dir / version
        if os.path.lexists(name_dir / SHARED_MARKER):
            self._shared.add(adapter_id)

    def _report(self, adapter_id: str, message: str) -> None:
        log.error("adapter store: %s", message)
        self._problems[adapter_id] = StoreProblem(adapter_id, message)


def _adapter_dirs(root: Path) -> list[tuple[str, str]]:
    """(tenant, name) of every adapter directory on disk."""
    out = []
    for tenant in os.scandir(root):
        if ADAPTER_NAME.fullmatch(tenant.name) and tenant.is_dir(follow_symlinks=False):
            try:
                children = list(os.scandir(tenant.path))
            except FileNotFoundError:
                continue
            out += [(tenant.name, c.name) for c in children
                    if ADAPTER_NAME.fullmatch(c.name) and c.is_dir(follow_symlinks=False)]
    return out
