"""Reading and tidying one adapter's directory: which version `current` names, and deleting
the versions it superseded. Shared by the store's commits, its start-up recovery and its
refreshes; see `layout.py` for the layout and why superseded versions get a grace period."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from loraserve.store.layout import CURRENT_LINK, SHARED_MARKER, TMP_PREFIX, is_version_name, tmp_is_leftover

log = logging.getLogger(__name__)


def link_target(name_dir: Path) -> str | None:
    """What `current` in `name_dir` points at, or None if it is missing or not a symlink."""
    try:
        return os.readlink(name_dir / CURRENT_LINK)
    except OSError:
        return None


def read_current(name_dir: Path) -> str | None:
    """The version directory name `current` points at, when it is a well-formed one that
    exists; else None (no adapter under this name, or a broken one)."""
    version = link_target(name_dir)
    if version is None or not is_version_name(version):
        return None
    target = name_dir / version
    return version if target.is_dir() and not target.is_symlink() else None


def _superseded_for(name_dir: Path) -> float:
    """Seconds since `current` was last swapped (the symlink is new on every swap)."""
    try:
        return time.time() - os.lstat(name_dir / CURRENT_LINK).st_mtime
    except FileNotFoundError:
        return float("inf")


def _old_entries(name_dir: Path, grace_seconds: float) -> list[Path]:
    current = link_target(name_dir)
    old_enough = _superseded_for(name_dir) >= grace_seconds
    out = []
    try:
        children = list(name_dir.iterdir())
    except FileNotFoundError:  # removed meanwhile
        return []
    for child in children:
        if child.name in (CURRENT_LINK, SHARED_MARKER, current):
            continue
        if child.name.startswith(TMP_PREFIX):
            if tmp_is_leftover(child):
                out.append(child)
        elif old_enough:
            out.append(child)
    return out


def has_old_versions(name_dir: Path, grace_seconds: float) -> bool:
    """Whether `prune_versions` would delete anything (checked without the writer lock)."""
    return bool(_old_entries(name_dir, grace_seconds))


def prune_versions(name_dir: Path, grace_seconds: float) -> None:
    """Delete versions other than the current one once it has been current for
    `grace_seconds`, and abandoned temporary links. The caller holds the writer lock, so a
    version being committed (renamed in, not yet current) is never among them."""
    for path in _old_entries(name_dir, grace_seconds):
        remove_path(path)


def remove_path(path: Path) -> None:
    """Delete a file, symlink or tree; a failure is logged, not raised: what is left is a
    leftover that the next start-up deletes, and the operation that asked has succeeded."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("adapter store: could not delete %s (%s); it will be retried at start-up", path.name, exc)
