"""Staging: an adapter's files copied into the store's private area, hashed and checked
(sizes, config as plain JSON, the safetensors header) before anything is published.

Two ways in: `stage_files` copies files that exist whole (a registration from an import root),
`UploadStaging` writes an upload chunk by chunk as it arrives, so an upload costs the server one
chunk of memory whatever its size. A full disk while staging is RESOURCE_EXHAUSTED ("the adapter
store is full") and leaves nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from loraserve.errors import AdapterIncompatible, Cancelled, InvalidArgument, ResourceExhausted
from loraserve.store.adapter_config import AdapterConfig
from loraserve.store.layout import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    FileDigest,
    content_digest,
    copy_in_durably,
    fsync_dir,
    new_tmp_name,
    split_adapter_id,
    store_full_is_resource_exhausted,
)
from loraserve.store.safetensors_check import TensorHeader, check_safetensors_header


class StagedAdapter:
    """An adapter's files copied into the store's staging area, hashed, its config parsed and
    its safetensors header checked, not yet published: what admission needs, found once. `path`
    is a PEFT directory only the store writes, so validating it and then committing it cannot be
    raced. Leaving a `with` block without committing deletes it."""

    def __init__(self, adapter_id: str, path: Path, files: tuple[FileDigest, ...], config: AdapterConfig,
                 headers: dict[str, TensorHeader]) -> None:
        self.adapter_id = adapter_id
        self.path = path
        self.files = files
        self.config = config
        self.headers = headers
        """Tensor name -> (dtype, shape), from the header: nothing of the data is read yet."""
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


def stage_files(root: Path, name: str, files: Mapping[str, bytes | Path], max_adapter_bytes: int) -> StagedAdapter:
    """Copy an adapter's two files (contents, or paths to read) into a new `.tmp-*` directory
    of `root`. Refuses a bad name, other file names, a missing file, an adapter over
    `max_adapter_bytes`, a config that is not a JSON object, and a malformed safetensors header."""
    split_adapter_id(name)
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
    if total > max_adapter_bytes:
        raise ResourceExhausted(f"adapter {name!r} is {total:,} bytes, over the per-adapter limit "
                                f"of {max_adapter_bytes:,}")
    if sizes[CONFIG_FILE] > MAX_CONFIG_BYTES:
        raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} is {sizes[CONFIG_FILE]:,} bytes, "
                                  f"over the limit of {MAX_CONFIG_BYTES:,}")
    staging = root / new_tmp_name("stage")
    try:
        with store_full_is_resource_exhausted():
            os.mkdir(staging)
            digests = tuple(copy_in_durably(staging / f, files[f], sizes[f], f"adapter {name!r}: {f}")
                            for f in ADAPTER_FILES)
            fsync_dir(staging)
        config, headers = _check_staged_files(staging, name, max_adapter_bytes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StagedAdapter(name, staging, digests, config, headers)


def _check_staged_files(staging: Path, name: str,
                        max_adapter_bytes: int) -> tuple[AdapterConfig, dict[str, TensorHeader]]:
    """The config, parsed, and the header's tensors, checked: once, for everything after."""
    if (staging / CONFIG_FILE).stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} is over the limit of {MAX_CONFIG_BYTES:,} bytes")
    config = AdapterConfig.from_bytes((staging / CONFIG_FILE).read_bytes(), name)
    headers = check_safetensors_header(staging / WEIGHTS_FILE, max_adapter_bytes,
                                       label=f"adapter {name!r}: {WEIGHTS_FILE}")
    return config, headers


class UploadStaging:
    """An upload written into a new `.tmp-upload-*` directory of the store as its chunks arrive,
    each file hashed on the way. `write` and `finish` block (disk writes: callers run them on a
    worker thread); making the object does no I/O, so a caller holds it before its first await
    and can always discard it. `finish()` checks what arrived and hands it on as a StagedAdapter;
    `discard()` (or leaving a `with` block without finishing) deletes it, and a write that races
    with a discard writes nothing."""

    def __init__(self, root: Path, name: str, max_adapter_bytes: int) -> None:
        split_adapter_id(name)
        self.name = name
        self.max_adapter_bytes = max_adapter_bytes
        self.path = root / new_tmp_name("upload")
        self._files: dict[str, tuple[object, object]] = {}  # file name -> (open file, sha256)
        self._sizes = dict.fromkeys(ADAPTER_FILES, 0)
        self._lock = threading.Lock()  # a discard on one thread, a write still running on another
        self._created = False
        self._done = False

    @property
    def size_bytes(self) -> int:
        return sum(self._sizes.values())

    def write(self, file_name: str, data: bytes) -> None:
        """Append `data` to `file_name` (one of the two adapter files)."""
        if file_name not in ADAPTER_FILES:
            raise InvalidArgument(f"only {CONFIG_FILE} and {WEIGHTS_FILE} may be uploaded, got {file_name!r}")
        with self._lock:
            if self._done:
                raise Cancelled("the upload ended before this chunk was written")
            if self.size_bytes + len(data) > self.max_adapter_bytes:
                raise ResourceExhausted(f"upload is over the per-adapter limit of {self.max_adapter_bytes:,} bytes")
            if file_name == CONFIG_FILE and self._sizes[CONFIG_FILE] + len(data) > MAX_CONFIG_BYTES:
                raise AdapterIncompatible(f"adapter {self.name!r}: {CONFIG_FILE} is over the limit of "
                                          f"{MAX_CONFIG_BYTES:,} bytes")
            with store_full_is_resource_exhausted():
                if not self._created:
                    os.mkdir(self.path)
                    self._created = True
                if file_name not in self._files:
                    self._files[file_name] = (open(self.path / file_name, "xb"), hashlib.sha256())
                f, digest = self._files[file_name]
                f.write(data)
                f.flush()  # in the file now, not in a buffer of this process
            digest.update(data)
            self._sizes[file_name] += len(data)

    def finish(self) -> StagedAdapter:
        """Make what arrived durable and check it (both files present, sizes, config, header)."""
        with self._lock:
            for file_name in ADAPTER_FILES:
                if file_name not in self._files:
                    raise AdapterIncompatible(f"adapter {self.name!r} has no {file_name}: the upload sent none of it")
            digests = []
            with store_full_is_resource_exhausted():
                for file_name in ADAPTER_FILES:
                    f, digest = self._files.pop(file_name)
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                    digests.append(FileDigest(file_name, digest.hexdigest(), self._sizes[file_name]))
                fsync_dir(self.path)
            config, headers = _check_staged_files(self.path, self.name, self.max_adapter_bytes)
            self._done = True
        return StagedAdapter(self.name, self.path, tuple(digests), config, headers)

    def discard(self) -> None:
        """Delete what was written (a no-op once finished: the StagedAdapter owns it then)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            for f, _ in self._files.values():
                with contextlib.suppress(OSError):
                    f.close()
            if self._created:
                shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


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
