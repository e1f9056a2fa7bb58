"""Import roots: which server-side paths `RegisterAdapter` may read an adapter from, and that a
refusal never tells the client where the roots or anything outside them are.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from store_helpers import adapter_files, write_dir

from loraserve.errors import InvalidArgument
from loraserve.store.import_roots import resolve_import_path
from loraserve.store.layout import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path, Path]:
    """(import root, a second import root, a directory outside both) with adapters in each."""
    root, second, outside = tmp_path / "imports", tmp_path / "more", tmp_path / "secret"
    write_dir(root / "team" / "good", adapter_files(1))
    write_dir(second / "only-here", adapter_files(1))
    write_dir(outside / "adapter", adapter_files(2))
    return root, second, outside


def test_import_paths_inside_the_roots_are_accepted(roots, tmp_path):
    root, second, _ = roots
    good = (root / "team" / "good").resolve()
    assert resolve_import_path("team/good", [root, second]) == good
    assert resolve_import_path(str(root / "team" / "good"), [root]) == good
    assert resolve_import_path("only-here", [root, second]) == (second / "only-here").resolve()
    os.symlink(root / "team" / "good", root / "alias")  # a symlink that stays inside is fine
    assert resolve_import_path("alias", [root]) == good
    os.symlink(root, tmp_path / "root-link")  # so is a root that is itself a symlink
    assert resolve_import_path(str(tmp_path / "root-link" / "team" / "good"), [tmp_path / "root-link"]) == good


@pytest.mark.parametrize("case, words", [
    ("dotdot", "must not contain '..'"),
    ("dotdot-inside", "must not contain '..'"),
    ("absolute-elsewhere", "outside the import roots"),
    ("absolute-elsewhere-missing", "outside the import roots"),
    ("symlinked-dir", "outside the import roots"),
    ("symlinked-file", "adapter_model.safetensors in 'leaky' is outside the import roots"),
    ("zip", "archives are not accepted"),
    ("tar.gz", "archives are not accepted"),
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("empty", "path is empty"),
    ("loop", "symlink loop"),
])
def test_import_path_escapes_are_refused(roots, case, words):
    root, _, outside = roots
    path = {
        "dotdot": "../secret/adapter",
        "dotdot-inside": "team/../team/good",
        "absolute-elsewhere": str(outside / "adapter"),
        "absolute-elsewhere-missing": str(outside / "nothing-here"),
        "symlinked-dir": "escape",
        "symlinked-file": "leaky",
        "zip": "adapter.zip",
        "tar.gz": "adapter.tar.gz",
        "missing": "nope",
        "file": f"team/good/{CONFIG_FILE}",
        "empty": "  ",
        "loop": "loop",
    }[case]
    os.symlink(outside / "adapter", root / "escape")
    leaky = write_dir(root / "leaky", {CONFIG_FILE: b"{}"})
    os.symlink(outside / "adapter" / WEIGHTS_FILE, leaky / WEIGHTS_FILE)
    (root / "adapter.zip").write_bytes(b"PK\x03\x04")
    (root / "adapter.tar.gz").write_bytes(b"\x1f\x8b")
    os.symlink(root / "loop", root / "loop")
    with pytest.raises(InvalidArgument, match=words) as info:
        resolve_import_path(path, [root])
    told = info.value.message.replace(repr(path), "")  # echoing the client's own string is fine
    for secret in (str(outside), str(root.resolve()), str(outside.resolve())):
        assert secret not in told
