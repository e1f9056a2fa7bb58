"""Turns a client's adapter path into a directory inside one of the server's import roots.

RegisterAdapter takes a path, so a client could otherwise make the server read any file it
can reach. The rule: after every symlink is resolved, the directory and each adapter file in
it must lie inside a resolved import root. Containment is decided before anything is checked
for existence, so the answers for "outside" and "missing outside" are the same and a client
cannot probe the server's filesystem. Errors never echo a resolved server path; echoing the
client's own string is fine.

Residual risk, by design: between this check and the read, someone who can write inside an
import root could swap a directory for a symlink. Import roots are meant to be written only
by trusted operators and pipelines; the store copies and hashes the files once, and only
that copy is validated and served.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from loraserve.errors import InvalidArgument
from loraserve.store.layout import ADAPTER_FILES

ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z")
MAX_PATH_CHARS = 1024
"""Longer than any adapter directory an operator sets up; Linux refuses paths past 4,096 bytes."""


def resolve_import_path(path: str, roots: Sequence[Path]) -> Path:
    """The resolved adapter directory named by `path` (absolute, or relative to an import
    root, tried in order). InvalidArgument when it is empty, uses '..', lies (or resolves)
    outside every root, does not exist, is an archive or another non-directory, or when one
    of its adapter files resolves outside its root."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidArgument("path is empty; give an adapter directory under an import root")
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL character")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidArgument(f"path is {len(path):,} characters, longer than the {MAX_PATH_CHARS:,} this server reads")
    given = Path(path)
    # '..' inside a root is harmless after resolution, but refusing it outright keeps the
    # rule simple to state and removes a whole class of lexical tricks.
    if ".." in given.parts:
        raise InvalidArgument(f"path {path!r} must not contain '..'")
    existing = _existing_roots(roots)
    if not existing:
        raise InvalidArgument("this server has no import roots; upload the adapter instead")

    outside = True  # stays True when no candidate lies inside a root
    for root, candidate in _candidates(given, existing):
        try:
            resolved = candidate.resolve(strict=False)
        except (OSError, RuntimeError):  # a symlink loop
            raise InvalidArgument(f"path {path!r} cannot be resolved (symlink loop?)") from None
        if not resolved.is_relative_to(root):
            continue  # e.g. a symlink under the root pointing elsewhere
        outside = False
        try:
            exists, is_file, is_dir = resolved.exists(), resolved.is_file(), resolved.is_dir()
        except OSError as exc:  # a component too long, a permission: nothing to read there
            raise InvalidArgument(f"path {path!r} cannot be read ({exc.strerror})") from None
        if not exists:
            continue  # a relative path may exist under a later root
        if is_file and resolved.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise InvalidArgument(f"path {path!r} is an archive; archives are not accepted, "
                                  "unpack the adapter into a directory")
        if not is_dir:
            raise InvalidArgument(f"path {path!r} is not a directory")
        _check_files_inside(resolved, root, path)
        return resolved
    if outside:
        raise InvalidArgument(f"path {path!r} is outside the import roots")
    raise InvalidArgument(f"path {path!r} does not exist under the import roots")


def _existing_roots(roots: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(root as configured, made absolute; root resolved) for every root that exists; a root
    that does not exist holds nothing."""
    out = []
    for root in roots:
        try:
            out.append((Path(root).absolute(), Path(root).resolve(strict=True)))
        except (OSError, RuntimeError):
            continue
    return out


def _candidates(given: Path, roots: list[tuple[Path, Path]]) -> Iterator[tuple[Path, Path]]:
    """(resolved root, path to resolve) pairs to try. An absolute path is only resolved when
    it lies lexically under a root (as configured or resolved), so a path elsewhere is refused
    without touching the filesystem outside the roots."""
    for configured, resolved_root in roots:
        if not given.is_absolute():
            yield resolved_root, resolved_root / given
        elif given.is_relative_to(configured) or given.is_relative_to(resolved_root):
            yield resolved_root, given


def _check_files_inside(directory: Path, root: Path, path: str) -> None:
    """Each adapter file, if present, must resolve inside `root`: a symlinked file pointing
    elsewhere would otherwise be read. Missing files are left for the reader to report."""
    for name in ADAPTER_FILES:
        try:
            target = (directory / name).resolve(strict=False)
        except (OSError, RuntimeError):
            raise InvalidArgument(f"{name} in {path!r} cannot be resolved (symlink loop?)") from None
        if not target.is_relative_to(root):
            raise InvalidArgument(f"{name} in {path!r} is outside the import roots")
