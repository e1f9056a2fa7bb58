"""API keys: the token format, the keys file, and checking a presented token against it.

A key is `lsk_<key_id>_<secret>`: key_id is 12 lowercase hex characters naming the key in the
file (safe to log), secret is 32 random bytes as 43 urlsafe base64 characters (never stored).
The keys file holds, per key, a random salt and sha256(salt + secret):

    keys:
      - name: hospital-a-ci          # unique; shown in audit logs
        key_id: 3f9a0c12b4e7
        tenant: hospital-a
        role: manage                 # generate | manage | admin
        salt: <32 hex>
        sha256: <64 hex>
        created: "2026-11-28T05:00:00Z"
    tenants:                         # optional; a limit left out is unbounded
      hospital-a: {max_adapters: 50, max_store_bytes: 10737418240, max_concurrent_requests: 16,
                   requests_per_second: 50}

Why a plain salted sha256 and not bcrypt/scrypt/argon2: those slow KDFs exist to protect
low-entropy passwords from offline guessing. Every secret here is 256 bits from `secrets`, so
even a leaked file cannot be brute-forced at any hash speed, while a slow KDF would add tens of
milliseconds of CPU to every single RPC (and be a cheap denial-of-service lever). The salt
keeps equal secrets from having equal hashes across files.

`KeyRing` is one validated snapshot of the file; `KeyFile` keeps a running server's snapshot
current (SIGHUP, or a change seen by polling). Writing the file (`loraserve keys add/remove`)
lives in `loraserve.access.key_admin`. Torch-free and grpc-free: the API layer maps
`Unauthenticated` and `ConfigError` to statuses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from loraserve.access.file_signature import FileSignature, file_signature
from loraserve.access.principal import ROLES, Principal, TenantLimits
from loraserve.errors import ConfigError, Unauthenticated
from loraserve.rfc3339 import format_utc

log = logging.getLogger(__name__)

KEY_PREFIX = "lsk_"
KEY_ID_HEX = 12
SECRET_BYTES = 32
SECRET_CHARS = 43  # len(base64url(32 bytes)) without the '=' padding
SALT_BYTES = 16

# The whole token, anchored: a fixed-length hex id, then a fixed-length base64url secret. The
# secret alphabet contains '_' too, which is why the id has a fixed length instead of a split.
_TOKEN = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{KEY_ID_HEX}}})_([A-Za-z0-9_-]{{{SECRET_CHARS}}})")
_KEY_ID = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX}}}")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The same rule as adapter names (loraserve.store.layout.ADAPTER_NAME, a test keeps them equal):
# a tenant becomes a directory of the store. Repeated here so access does not import the store.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

UNAUTHENTICATED_MESSAGE = "missing or unknown API key"
"""The one message of every failed authentication: it never says which part was wrong."""

_ENTRY_FIELDS = ("name", "key_id", "tenant", "role", "salt", "sha256", "created")
_REQUIRED_FIELDS = frozenset(_ENTRY_FIELDS) - {"created"}
_INT_LIMITS = ("max_adapters", "max_store_bytes", "max_concurrent_requests")
_LIMITS = (*_INT_LIMITS, "requests_per_second")


@dataclass(frozen=True)
class KeyRecord:
    """One key as the file stores it: who it is, and the salted hash of its secret."""

    name: str
    key_id: str
    tenant: str
    role: str
    salt: bytes = b""
    sha256: bytes = b""
    created: str = ""

    def __repr__(self) -> str:  # hashes are not secrets, but they have no business in logs
        return f"KeyRecord(name={self.name!r}, key_id={self.key_id!r}, tenant={self.tenant!r}, role={self.role!r})"


# Stands in for the record of an unknown key_id so that path hashes and compares exactly like a
# known key with a wrong secret. Its digest is random, so no secret can ever match it.
_DUMMY = KeyRecord(name="", key_id="", tenant="", role="generate", salt=secrets.token_bytes(SALT_BYTES),
                   sha256=secrets.token_bytes(32))


def hash_secret(salt: bytes, secret: str) -> bytes:
    """sha256(salt + secret as UTF-8): what the keys file stores (see the module docstring)."""
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def new_token(key_id: str) -> tuple[str, str]:
    """(token, secret) for a new key with `key_id`; the secret comes from `secrets`."""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return f"{KEY_PREFIX}{key_id}_{secret}", secret


class KeyRing:
    """An immutable, validated keys file: authenticates tokens and answers tenant limits."""

    def __init__(self, records: tuple[KeyRecord, ...], limits: Mapping[str, TenantLimits], source: str) -> None:
        self.records = records
        self.source = source
        self._by_id = MappingProxyType({r.key_id: r for r in records})
        self._limits = MappingProxyType(dict(limits))
        self._principals = MappingProxyType({r.key_id: Principal(r.name, r.tenant, r.role) for r in records})
        self.tenants: frozenset[str] = frozenset({r.tenant for r in records} | set(limits))
        """Every tenant named by a key or by the tenants section."""

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """Read and validate a keys file (YAML; JSON is read the same way, being YAML).
        ConfigError naming the file, the entry and the field for anything wrong."""
        return cls.from_document(read_document(path), str(path))

    @classmethod
    def from_document(cls, doc: Any, source: str) -> KeyRing:
        """Validate a parsed keys file; `source` names it in error messages."""
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: expected a mapping with a `keys:` list, got {_kind(doc)}")
        unknown = set(doc) - {"keys", "tenants"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level keys {sorted(map(str, unknown))} (expected keys, tenants)")
        if not isinstance(doc.get("keys"), list):
            raise ConfigError(f"{source}: `keys` must be a list of key entries (an empty list is allowed), "
                              f"got {_kind(doc.get('keys'))}")
        records: list[KeyRecord] = []
        names: dict[str, int] = {}
        ids: dict[str, int] = {}
        for i, entry in enumerate(doc["keys"]):
            record = _record(entry, f"{source}: keys[{i}]")
            where = f"{source}: keys[{i}] ({record.name!r})"
            if record.name in names:
                raise ConfigError(f"{where}: field 'name': duplicate of keys[{names[record.name]}]")
            if record.key_id in ids:
                raise ConfigError(f"{where}: field 'key_id': duplicate of keys[{ids[record.key_id]}]")
            names[record.name], ids[record.key_id] = i, i
            records.append(record)
        return cls(tuple(records), _tenant_limits(doc.get("tenants"), source), source)

    def authenticate(self, token: str | None) -> Principal:
        """The caller presenting `token`, or Unauthenticated with the same message whatever
        was wrong.

        Timing: a token that does not have the key format fails at once; that reveals only the
        public format. Every well-formed token then costs exactly one sha256 over salt + secret
        and one constant-time comparison: an unknown key_id is checked against a dummy record,
        so it does the same work as a known key_id with a wrong secret. (The dict lookup of the
        key_id is not constant-time, but key_ids are not secret; the secret is what this
        protects.)"""
        match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        key_id, secret = match.groups()
        record = self._by_id.get(key_id, _DUMMY)
        matches = hmac.compare_digest(hash_secret(record.salt, secret), record.sha256)
        if not matches or record is _DUMMY:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        return self._principals[key_id]

    def limits_for(self, tenant: str) -> TenantLimits:
        """The tenant's limits; unbounded for a tenant the tenants section does not name."""
        return self._limits.get(tenant, TenantLimits())

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"KeyRing({len(self)} keys, {len(self.tenants)} tenants, from {self.source})"


class KeyFile:
    """The current KeyRing of a keys file in a running server. `reload()` (on SIGHUP) and
    `reload_if_changed()` (polled every few seconds) swap in a new ring only when the new file
    is valid as a whole: a broken edit leaves the old keys in force, so a typo never locks
    every client out (nor lets anyone in).

    Thread-safe: reloads are serialised by a lock; readers take `ring`, an immutable snapshot
    (one attribute read, atomic in Python), so a request never sees half of two files."""

    def __init__(self, path: str | Path) -> None:
        """Load `path`; ConfigError when it is missing or invalid (the server must not start)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = file_signature(self.path)
        self._ring = KeyRing.load(self.path)

    @property
    def ring(self) -> KeyRing:
        return self._ring

    def authenticate(self, token: str | None) -> Principal:
        """`KeyRing.authenticate` on the current snapshot."""
        return self._ring.authenticate(token)

    def reload(self) -> bool:
        """Re-read the file. True when the new keys are in force; False (and an error logged)
        when the file is unreadable or invalid, in which case the old keys stay in force."""
        with self._lock:
            return self._reload_locked(file_signature(self.path))

    def reload_if_changed(self) -> bool:
        """Reload when the file's signature differs from the last one read. True only when new
        keys came into force. A broken file is reported once, not at every poll: its signature
        is remembered, and the next change (the fix) is read again."""
        with self._lock:
            signature = file_signature(self.path)
            if signature == self._signature:
                return False
            return self._reload_locked(signature)

    def _reload_locked(self, signature: FileSignature) -> bool:
        # The signature is taken before the read: a change racing the read makes the next poll
        # read again, instead of being missed.
        self._signature = signature
        old = self._ring
        try:
            ring = KeyRing.load(self.path)
        except ConfigError as exc:
            log.error("keys file not reloaded, the previous %d keys stay in force: %s", len(old), exc.message)
            return False
        self._ring = ring
        # WARNING like the server's other lifecycle lines: who may call is worth seeing at the
        # default log level.
        log.warning("keys file %s reloaded: %d keys (was %d), %d tenants", self.path, len(ring), len(old),
                    len(ring.tenants))
        return True


def read_document(path: str | Path) -> Any:
    """The parsed keys file. yaml.safe_load reads JSON too (JSON is YAML), so one reader serves
    both; safe_load builds only plain data, never objects."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"keys file {path} does not exist (create it with `loraserve keys add`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read keys file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML/JSON{at}: {getattr(exc, 'problem', None) or exc}") from None


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _record(entry: Any, where: str) -> KeyRecord:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with fields {', '.join(_ENTRY_FIELDS)}, got {_kind(entry)}")
    name = entry.get("name")
    if isinstance(name, str) and KEY_NAME.fullmatch(name):
        where = f"{where} ({name!r})"
    unknown = set(entry) - set(_ENTRY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {sorted(map(str, unknown))} (expected {', '.join(_ENTRY_FIELDS)})")
    missing = sorted(_REQUIRED_FIELDS - set(entry))
    if missing:
        raise ConfigError(f"{where}: missing field {', '.join(repr(m) for m in missing)}")

    def string(field: str, pattern: re.Pattern, rule: str) -> str:
        value = entry[field]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ConfigError(f"{where}: field {field!r}: {value!r} is not {rule}")
        return value

    name = string("name", KEY_NAME, "a valid key name (letters, digits, '.', '_', '-'; at most 64, "
                  "starting with a letter or digit)")
    key_id = string("key_id", _KEY_ID, f"{KEY_ID_HEX} lowercase hex characters")
    tenant = string("tenant", TENANT_NAME, "a valid tenant name (letters, digits, '.', '_', '-'; at most 128, "
                    "starting with a letter or digit)")
    role = entry["role"]
    if role not in ROLES:
        raise ConfigError(f"{where}: field 'role': unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return KeyRecord(name=name, key_id=key_id, tenant=tenant, role=role,
                     salt=_hex(entry["salt"], SALT_BYTES, f"{where}: field 'salt'"),
                     sha256=_hex(entry["sha256"], 32, f"{where}: field 'sha256'"),
                     created=_created(entry.get("created"), where))


def _hex(value: Any, n_bytes: int, where: str) -> bytes:
    # The value itself is never echoed: it is only a hash, but it has no place in a log line.
    if not isinstance(value, str) or len(value) != 2 * n_bytes:
        got = f"{len(value)} characters" if isinstance(value, str) else _kind(value)
        raise ConfigError(f"{where}: must be {2 * n_bytes} hex characters, got {got}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{where}: must be {2 * n_bytes} hex characters, found a non-hex character") from None


def _created(value: Any, where: str) -> str:
    """RFC 3339 text. YAML turns an unquoted timestamp into a datetime, so accept that too."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return format_utc(value)
    if isinstance(value, str):
        try:
            dt.datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise ConfigError(f"{where}: field 'created': {value!r} is not an RFC 3339 time such as 2026-11-28T05:00:00Z")


def _tenant_limits(section: Any, source: str) -> dict[str, TenantLimits]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: `tenants` must be a mapping of tenant name to limits, got {_kind(section)}")
    limits = {}
    for tenant, values in section.items():
        where = f"{source}: tenants[{tenant!r}]"
        if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
            raise ConfigError(f"{where}: not a valid tenant name (letters, digits, '.', '_', '-'; at most 128, "
                              "starting with a letter or digit)")
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of limits ({', '.join(_LIMITS)}), got {_kind(values)}")
        unknown = set(values) - set(_LIMITS)
        if unknown:
            raise ConfigError(f"{where}: unknown limits {sorted(map(str, unknown))} (expected {', '.join(_LIMITS)})")
        limits[tenant] = TenantLimits(**{k: _limit(k, v, where) for k, v in values.items()})
    return limits


def _limit(field: str, value: Any, where: str) -> int | float | None:
    """A positive number, or None (unbounded). Zero is refused rather than guessed at: the
    server's own max_store_bytes uses 0 for unlimited, so a 0 here would be read both ways. To
    shut a tenant out, remove its keys."""
    if value is None:
        return None
    if field in _INT_LIMITS:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        rule = "a positive integer"
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and value > 0)
        rule = "a positive number"
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(f"{where}: field {field!r}: {value!r} is not {rule} (leave it out for unbounded)")
    return value
