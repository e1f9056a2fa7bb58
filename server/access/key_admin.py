"""Editing a keys file: `loraserve keys add/remove/list`. A new key's plaintext is returned once
and never written; the file gets only its salt and hash (see loraserve.access.keys).

Every change validates the whole existing file first (a broken file is never made worse),
edits the parsed document (other keys and the tenants section are kept; YAML comments and
layout are not, being rewritten from the parsed data), and replaces the file atomically: a server polling it reads the old file
or the new one, never half of one.

One writer at a time: two `keys add` racing on the same file may lose one of the keys (the
last os.replace wins). This is an operator's tool, run by hand or by one deploy job; a lock
file next to the keys would not help where the file is a read-only Kubernetes Secret anyway.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from loraserve.access.keys import (
    KEY_ID_HEX,
    KEY_NAME,
    SALT_BYTES,
    TENANT_NAME,
    KeyRing,
    hash_secret,
    new_token,
    read_document,
)
from loraserve.access.principal import ROLES
from loraserve.errors import ConfigError
from loraserve.rfc3339 import now_utc


class KeyInfo(NamedTuple):
    """A key as `keys list` shows it: never the secret, nor its hash."""

    name: str
    key_id: str
    tenant: str
    role: str
    created: str


def add_key(path: str | Path, name: str, tenant: str, role: str) -> str:
    """Add a key to the file (created, mode 0600, when absent) and return its plaintext token,
    the only time it exists: the file keeps a salted hash."""
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise ConfigError(f"invalid key name {name!r}: use letters, digits, '.', '_', '-' "
                          "(at most 64, starting with a letter or digit)")
    if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
        raise ConfigError(f"invalid tenant name {tenant!r}: use letters, digits, '.', '_', '-' "
                          "(at most 128, starting with a letter or digit)")
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    path = Path(path)
    doc, ring = _read(path, missing_ok=True)
    if any(r.name == name for r in ring.records):
        raise ConfigError(f"{path}: a key named {name!r} already exists (remove it first to replace it)")
    taken = {r.key_id for r in ring.records}
    key_id = secrets.token_hex(KEY_ID_HEX // 2)
    while key_id in taken:  # 48 random bits: a collision is rare, but would make the file invalid
        key_id = secrets.token_hex(KEY_ID_HEX // 2)
    token, secret = new_token(key_id)
    salt = secrets.token_bytes(SALT_BYTES)
    doc["keys"].append({"name": name, "key_id": key_id, "tenant": tenant, "role": role, "salt": salt.hex(),
                        "sha256": hash_secret(salt, secret).hex(), "created": now_utc()})
    _write(path, doc)
    return token


def remove_key(path: str | Path, name: str) -> None:
    """Remove the key called `name`; ConfigError when the file has none."""
    path = Path(path)
    doc, ring = _read(path, missing_ok=False)
    index = next((i for i, r in enumerate(ring.records) if r.name == name), None)
    if index is None:
        raise ConfigError(f"{path}: no key named {name!r}")
    del doc["keys"][index]  # records and doc["keys"] are in the same order
    _write(path, doc)


def list_keys(path: str | Path) -> list[KeyInfo]:
    """Every key in the file, in file order."""
    return [KeyInfo(r.name, r.key_id, r.tenant, r.role, r.created) for r in KeyRing.load(path).records]


def _read(path: Path, missing_ok: bool) -> tuple[dict[str, Any], KeyRing]:
    """The parsed document and its validation; an empty document when absent and missing_ok."""
    if missing_ok and not path.exists():
        doc: Any = {"keys": []}
    else:
        doc = read_document(path)
    ring = KeyRing.from_document(doc, str(path))
    for entry, record in zip(doc["keys"], ring.records):
        if not isinstance(entry.get("created"), (str, type(None))):  # an unquoted YAML timestamp was read as a datetime: write text back
            entry["created"] = record.created
    return doc, ring


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` atomically with `doc` (JSON for a .json name, else YAML), mode 0600.

    The temporary file is made in the same directory (os.replace is atomic only within one
    file system) by mkstemp, which creates it 0600 before any byte is written, so the hashes
    are never readable by others even for a moment; fsync'd before the rename, and the
    directory after it, so a crash leaves the old file or the new one."""
    if path.name.endswith(".json"):
        text = json.dumps(doc, indent=2) + "\n"
    else:
        # "created" is written as a string; safe_dump quotes it because YAML would otherwise
        # read it back as a timestamp.
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
