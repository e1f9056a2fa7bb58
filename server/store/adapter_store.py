"""The adapter store: the adapters on disk that the server serves, and the source of truth for
which ones exist (what is published survives a restart). Layout and atomicity: `layout.py`.

Publishing is two steps so that what is validated is exactly what is served:
`stage()` copies the files into the store's private staging area (hashing them, checking
sizes and the safetensors header), the caller validates the staged copy against the base
(`Engine.check_adapter(name, staged.path)`), and `commit()` records the manifest and swaps
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
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from server.errors import (
    AdapterAlreadyExists,
    AdapterIncompatible,
    AdapterNotFound,
    ConfigError,
    InvalidArgument,
    ResourceExhausted,
)
from server.store.layout import (
    ADAPTER_FILES,
    ADAPTER_NAME,
    CONFIG_FILE,
    CURRENT_LINK,
    LOCK_FILE,
    MANIFEST_FILE,
    MAX_CONFIG_BYTES,
    TMP_PREFIX,
    WEIGHTS_FILE,
    FileDigest,
    Manifest,
    check_adapter_name,
    content_digest,
    copy_in_durably,
    fsync_dir,
    new_tmp_name,
    new_version_name,
    now_rfc3339,
    swap_symlink,
    tmp_is_leftover,
    verify_version,
    write_durably,
)
from server.store.safetensors_check import check_safetensors_header
from server.store.versions import has_old_versions, link_target, prune_versions, read_current, remove_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreProblem:
    """An adapter found at start-up that is not served, and why (for logs and operators)."""

    name: str
    message: str


class StagedAdapter:
    """An adapter's files copied into the store's staging area, hashed and header-checked, not
    yet published. `path` is a PEFT directory only the store writes, so validating it and
    then committing it cannot be raced. Leaving a `with` block without committing deletes it."""

    def __init__(self, name: str, path: Path, files: tuple[FileDigest, ...]) -> None:
        self.name = name
        self.path = path
        self.files = files
        self.size_bytes = sum(f.size_bytes for f in files)
        by_name = {f.name: f.sha256 for f in files}
        self.digest = content_digest(by_name[CONFIG_FILE], by_name[WEIGHTS_FILE])
        self.done = False

    def discard(self) -> None:
        """Delete the staged files (a no-op once committed or discarded)."""
        if not self.done:
            self.done = True
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


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
        self._paths: dict[str, Path] = {}  # name -> its current version directory
        self._problems: dict[str, StoreProblem] = {}
        self._bad_versions: dict[str, str] = {}  # name -> the version found broken at start-up
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
        """Adapters on disk that are not served (found broken at start-up), by name."""
        with self._lock:
            return sorted(self._problems.values(), key=lambda p: p.name)

    def list(self) -> list[Manifest]:
        """Every served adapter's manifest, by name."""
        with self._lock:
            return [self._index[name] for name in sorted(self._index)]

    def get(self, name: str) -> Manifest:
        check_adapter_name(name)
        with self._lock:
            if name not in self._index:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            return self._index[name]

    def path_of(self, name: str) -> Path:
        """The current version's directory (a PEFT directory, readable by `read_adapter_dir`).
        It names that version, not `current`, so it never changes under a reader; a replace
        or remove deletes it once it is superseded."""
        check_adapter_name(name)
        with self._lock:
            if name not in self._paths:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            return self._paths[name]

    def total_bytes(self) -> int:
        """Bytes of adapter files over every served adapter (what `max_store_bytes` bounds)."""
        with self._lock:
            return sum(m.size_bytes for m in self._index.values())

    # ---- publishing --------------------------------------------------------------------
    def stage(self, name: str, files: Mapping[str, bytes | Path]) -> StagedAdapter:
        """Copy an adapter's two files (contents, or paths to read) into the staging area.
        Refuses a bad name, other file names, a missing file, an adapter over the per-adapter
        limit, a config that is not a JSON object, and a malformed safetensors header."""
        check_adapter_name(name)
        unexpected = sorted(set(files) - set(ADAPTER_FILES))
        if unexpected:
            raise InvalidArgument(f"adapter {name!r}: unexpected file {unexpected[0]!r}; an adapter is "
                                  f"exactly {CONFIG_FILE} and {WEIGHTS_FILE}")
        sizes = {}
        for file_name in ADAPTER_FILES:
            if file_name not in files:
                raise AdapterIncompatible(f"adapter {name!r} has no {file_name}")
            sizes[file_name] = _source_size(files[file_name], f"adapter {name!r}: {file_name}")
        total = sum(sizes.values())
        if total > self.max_adapter_bytes:
            raise ResourceExhausted(f"adapter {name!r} is {total:,} bytes, over the per-adapter limit "
                                    f"of {self.max_adapter_bytes:,}")
        if sizes[CONFIG_FILE] > MAX_CONFIG_BYTES:
            raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} is {sizes[CONFIG_FILE]:,} bytes, "
                                      f"over the limit of {MAX_CONFIG_BYTES:,}")
        staging = self.root / new_tmp_name("stage")
        os.mkdir(staging)
        try:
            digests = tuple(copy_in_durably(staging / f, files[f], sizes[f], f"adapter {name!r}: {f}")
                            for f in ADAPTER_FILES)
            fsync_dir(staging)
            _check_config((staging / CONFIG_FILE).read_bytes(), name)
            check_safetensors_header(staging / WEIGHTS_FILE, self.max_adapter_bytes,
                                     label=f"adapter {name!r}: {WEIGHTS_FILE}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedAdapter(name, staging, digests)

    def commit(self, staged: StagedAdapter, *, r: int, lora_alpha: float, target_modules: Sequence[str],
               base_fingerprint: str, source: str, replace: bool = False,
               training: dict | None = None) -> tuple[Manifest, bool]:
        """Publish a staged adapter: (its manifest, True), or (the existing manifest, False)
        when the name already holds the same content. Different content under the name is
        AdapterAlreadyExists unless `replace`; going over `max_store_bytes` is
        ResourceExhausted. The staged files are consumed either way."""
        if staged.done:
            raise ValueError("this staged adapter was already committed or discarded")
        try:
            manifest = Manifest(name=staged.name, files=staged.files, r=r, lora_alpha=float(lora_alpha),
                                target_modules=tuple(target_modules), base_fingerprint=base_fingerprint,
                                size_bytes=staged.size_bytes, created_time=now_rfc3339(), source=source,
                                training=training)
            write_durably(staged.path / MANIFEST_FILE, manifest.to_json())
            fsync_dir(staged.path)
            with self._lock, self._writer():
                self._sync_name(staged.name)
                if self.max_store_bytes is not None:
                    self._sync_all()
                return self._commit_locked(staged, manifest, replace)
        finally:
            staged.discard()

    def publish(self, name: str, files: Mapping[str, bytes | Path], *, r: int, lora_alpha: float,
                target_modules: Sequence[str], base_fingerprint: str, source: str,
                replace: bool = False, training: dict | None = None) -> tuple[Manifest, bool]:
        """`stage` then `commit`, for files the caller has already validated."""
        with self.stage(name, files) as staged:
            return self.commit(staged, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                               base_fingerprint=base_fingerprint, source=source, replace=replace,
                               training=training)

    def _commit_locked(self, staged: StagedAdapter, manifest: Manifest, replace: bool) -> tuple[Manifest, bool]:
        name = manifest.name
        old = self._index.get(name)
        if old is not None and old.digest == manifest.digest:
            return old, False
        if old is not None and not replace:
            raise AdapterAlreadyExists(f"adapter {name!r} is already registered with different content; "
                                       "set replace to swap it")
        if self.max_store_bytes is not None:
            total = sum(m.size_bytes for m in self._index.values()) - (old.size_bytes if old else 0)
            total += manifest.size_bytes
            if total > self.max_store_bytes:
                raise ResourceExhausted(f"adapter {name!r} would bring the store to {total:,} bytes, over its "
                                        f"limit of {self.max_store_bytes:,}; remove adapters first")
        name_dir = self.root / name
        if not name_dir.is_dir():
            os.mkdir(name_dir)
            fsync_dir(self.root)
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
            self._record(name, manifest, name_dir / version)  # swapped; only its fsync failed
            raise
        self._record(name, manifest, name_dir / version)
        return manifest, True

    def _record(self, name: str, manifest: Manifest, version_dir: Path) -> None:
        """Index the new current version and delete the versions it supersedes (past the grace)."""
        self._index[name] = manifest
        self._paths[name] = version_dir
        self._problems.pop(name, None)
        self._bad_versions.pop(name, None)
        prune_versions(version_dir.parent, self.superseded_grace_seconds)

    # ---- what other processes changed -------------------------------------------------------
    def refresh(self) -> list[str]:
        """Re-read which version of each adapter is current on disk: the names another process
        published, replaced or removed since this one last looked, by name. Superseded
        versions past their grace are deleted on the way."""
        with self._lock:
            changed = self._sync_all()
            stale = [self.root / n for n in self._paths if has_old_versions(self.root / n, self.superseded_grace_seconds)]
        if stale:
            with self._lock, self._writer():
                for name_dir in stale:
                    prune_versions(name_dir, self.superseded_grace_seconds)
        return changed

    def refresh_one(self, name: str) -> bool:
        """`refresh` for one name (a cache miss): whether it changed."""
        check_adapter_name(name)
        with self._lock:
            return self._sync_name(name)

    def _sync_all(self) -> list[str]:
        on_disk = {e.name for e in os.scandir(self.root)
                   if ADAPTER_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)}
        return [name for name in sorted(on_disk | set(self._index)) if self._sync_name(name)]

    def _sync_name(self, name: str) -> bool:
        """Make the index entry for `name` match the disk; whether it changed. Another
        process's version is checked against its manifest by name and size (the full sha256
        check happens where the weights are read: the engine's digest must equal it)."""
        version = read_current(self.root / name)
        known = self._paths.get(name)
        if version is None:
            if known is None:
                return False
            del self._index[name], self._paths[name]
            return True
        if (known is not None and known.name == version) or self._bad_versions.get(name) == version:
            return False
        try:
            manifest = verify_version(name, self.root / name / version, hashes=False)
        except (ValueError, OSError) as exc:  # superseded while reading it: the next look sees the new one
            log.warning("adapter store: adapter %s, version %s: %s", name, version, exc)
            return False
        self._index[name] = manifest
        self._paths[name] = self.root / name / version
        self._problems.pop(name, None)
        return True

    def remove(self, name: str) -> None:
        """Delete an adapter (served, or broken at start-up); AdapterNotFound if neither."""
        check_adapter_name(name)
        with self._lock, self._writer():
            self._sync_name(name)
            if name not in self._index and name not in self._problems:
                raise AdapterNotFound(f"adapter {name!r} is not registered")
            # One rename takes the whole name out of the store atomically; the slow delete
            # happens after, and a crash during it leaves a `.tmp-*` that start-up deletes.
            tomb: Path | None = self.root / new_tmp_name("removed")
            try:
                os.rename(self.root / name, tomb)
            except FileNotFoundError:  # reported lost at start-up: nothing left on disk
                tomb = None
            self._index.pop(name, None)
            self._paths.pop(name, None)
            self._problems.pop(name, None)
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
                self._recover_adapter(entry.name, path)
            elif not entry.name.startswith("."):  # .lock, trainers' .checkpoints: ours, not adapters
                log.warning("adapter store: ignoring %r, which is not an adapter directory", entry.name)
        fsync_dir(self.root)
        log.info("adapter store: %d adapters served, %d not served", len(self._index), len(self._problems))

    def _recover_adapter(self, name: str, name_dir: Path) -> None:
        """Keep `current` and the version it names; delete what is left over; verify it."""
        had_link = os.path.lexists(name_dir / CURRENT_LINK)
        version = read_current(name_dir)
        if version is None:
            remove_path(name_dir)  # without `current` it was a first publish that never finished
            if had_link:
                self._report(name, f"adapter {name!r} was lost: its current version is missing")
            return
        prune_versions(name_dir, self.superseded_grace_seconds)
        try:
            manifest = verify_version(name, name_dir / version)
        except ValueError as exc:
            self._bad_versions[name] = version
            self._report(name, f"adapter {name!r} is not served: {exc}; publish it again or remove it")
            return
        self._index[name] = manifest
        self._paths[name] = name_dir / version

    def _report(self, name: str, message: str) -> None:
        log.error("adapter store: %s", message)
        self._problems[name] = StoreProblem(name, message)


def _check_config(data: bytes, name: str) -> None:
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({reason})") from None
    if not isinstance(config, dict):
        raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")


def _source_size(source: bytes | Path, label: str) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise AdapterIncompatible(f"{label} is missing") from None
    if not os.path.isfile(source):
        raise AdapterIncompatible(f"{label} is not a regular file")
    return st.st_size
