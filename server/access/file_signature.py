"""Telling whether a file on disk changed since it was read, for the files a running server
re-reads without a restart (the keys file, the TLS certificate and key)."""

from __future__ import annotations

import os
from pathlib import Path

FileSignature = tuple[int, int, int] | None
"""(st_mtime_ns, st_ino, st_size) of a file, None when it cannot be stat'ed."""


def file_signature(path: str | Path) -> FileSignature:
    """What changes when a file is rewritten. os.stat follows symlinks, which is what catches a
    Kubernetes Secret update: the kubelet swaps the `..data` symlink to a new directory, so the
    path resolves to a new inode while the path itself (a symlink) never changes. An editor
    that rewrites in place changes mtime (and usually size); os.replace changes the inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size
