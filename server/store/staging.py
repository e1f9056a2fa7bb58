"""Staging: an adapter's files copied into the store's private area, hashed and checked
(sizes, config as plain JSON, the safetensors header) before anything is published."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from server.errors import AdapterIncompatible, InvalidArgument, ResourceExhausted
from server.store.adapter_config import AdapterConfig
from server.store.layout import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    FileDigest,
    content_digest,
    copy_in_durably,
    fsync_dir,
    new_tmp_name,
    split_adapter_key,
)
from server.store.safetensors_check import check_safetensors_header


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


def stage_files(root: Path, name: str, files: Mapping[str, bytes | Path], max_adapter_bytes: int) -> StagedAdapter:
    """Copy an adapter's two files (contents, or paths to read) into a new `.tmp-*` directory
    of `root`. Refuses a bad name, other file names, a missing file, an adapter over
    `max_adapter_bytes`, a config that is not a JSON object, and a malformed safetensors header."""
    split_adapter_key(name)
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
    os.mkdir(staging)
    try:
        digests = tuple(copy_in_durably(staging / f, files[f], sizes[f], f"adapter {name!r}: {f}")
                        for f in ADAPTER_FILES)
        fsync_dir(staging)
        AdapterConfig.from_bytes((staging / CONFIG_FILE).read_bytes(), name)
        check_safetensors_header(staging / WEIGHTS_FILE, max_adapter_bytes,
                                 label=f"adapter {name!r}: {WEIGHTS_FILE}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StagedAdapter(name, staging, digests)




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
