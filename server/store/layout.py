"""The adapter store's on-disk layout, its manifest format and the durable file operations
that make every change atomic.

    <root>/
      .lock                          flock'd by a writer while it commits, removes or recovers
      .tmp-<kind>-<random>@<pid>@<host>/   a version being written, or a name being removed
      <tenant>/                      every adapter belongs to a tenant; its id is '<tenant>/<name>'
        <name>/
          current -> v-<digest16>-<nonce>     relative symlink, swapped with os.replace
          shared                      present when an admin shared the adapter with every tenant
          v-<digest16>-<nonce>/
            adapter_config.json
            adapter_model.safetensors
            manifest.json

A version directory is written completely under `.tmp-*`, fsync'd, then renamed into
`<name>/`; it becomes the served version only when `current` is swapped to it. So after a
crash at any point the adapter is either its old version or its new one, never a mix.

Several processes may share one store (replicas on a ReadWriteMany volume, a training job
publishing next to running servers). Every change of `current` happens under an exclusive
flock of `.lock`, held for milliseconds. A `.tmp-*` entry names the process writing it, so
start-up deletes only the leftovers of processes that are gone (or that are older than
`STALE_TMP_SECONDS`); a version not named by `current` is deleted once it has been superseded
for `SUPERSEDED_GRACE_SECONDS`, so a replica still reading it is not cut off mid-load.
A version directory is never rewritten or reused (the nonce makes every name new).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from loraserve.errors import AdapterIncompatible, InvalidArgument, ResourceExhausted

# The PEFT file names are repeated from `peft_files` rather than imported: that module
# imports torch, and the store (and the crash tests' child processes) must stay torch-free.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
"""Weights files PEFT may also write: pickles, which can run code when loaded, so never opened."""
MANIFEST_FILE = "manifest.json"
CURRENT_LINK = "current"
SHARED_MARKER = "shared"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
VERSION_PREFIX = "v-"
SOURCES = ("register", "upload", "trainer")

MANIFEST_FORMAT = 1
"""Written into every manifest.json so a later layout change can tell old manifests apart."""
MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json is about a kilobyte; a megabyte bound keeps its JSON parse cheap."""
MAX_MANIFEST_BYTES = 1 << 20

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_NAME = re.compile(r"^v-[0-9a-f]{16}-[0-9a-f]{8}$")


def check_adapter_name(name: str) -> None:
    """InvalidArgument unless `name` is a valid adapter name. The name becomes a directory,
    so this is also what keeps '..', '/', and hidden names out of the store."""
    # fullmatch, not match: with match, '$' also accepts a name ending in a newline.
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidArgument(f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' "
                              "(at most 128, starting with a letter or digit)")


def check_tenant_name(tenant: str) -> None:
    """InvalidArgument unless `tenant` is a valid tenant name (the same rules as adapter names:
    it becomes a directory too)."""
    if not isinstance(tenant, str) or not ADAPTER_NAME.fullmatch(tenant):
        raise InvalidArgument(f"invalid tenant name {tenant!r}: use letters, digits, '.', '_', '-' "
                              "(at most 128, starting with a letter or digit)")


def adapter_id(tenant: str, name: str) -> str:
    """The id an adapter has in the store and the engine: '<tenant>/<name>', both checked."""
    check_tenant_name(tenant)
    check_adapter_name(name)
    return f"{tenant}/{name}"


def split_adapter_id(adapter_id_: str) -> tuple[str, str]:
    """(tenant, name) of an id made by `adapter_id`; InvalidArgument for anything else."""
    if not isinstance(adapter_id_, str) or adapter_id_.count("/") != 1:
        raise InvalidArgument(f"invalid adapter id {adapter_id_!r}: expected '<tenant>/<name>'")
    tenant, name = adapter_id_.split("/")
    adapter_id(tenant, name)
    return tenant, name


def check_adapter_ref(ref: str) -> None:
    """InvalidArgument unless `ref` is an adapter name or a '<tenant>/<name>' id (the engine
    serves both: the server always uses ids, tests and embedders may use plain names)."""
    if isinstance(ref, str) and "/" in ref:
        split_adapter_id(ref)
    else:
        check_adapter_name(ref)


def new_version_name(digest: str) -> str:
    """A fresh version directory name for content `digest` ('sha256:<hex>')."""
    return f"{VERSION_PREFIX}{digest.removeprefix('sha256:')[:16]}-{secrets.token_hex(4)}"


def is_version_name(name: str) -> bool:
    return bool(_VERSION_NAME.fullmatch(name))


STALE_TMP_SECONDS = 3600.0
"""A `.tmp-*` entry of another host is deleted once it is this old: staging an adapter takes
seconds, so an hour-old one belongs to a writer that died."""


def new_tmp_name(kind: str) -> str:
    """A fresh `.tmp-*` name that records its writer (pid and host); `kind` only helps a
    person reading a directory listing."""
    return f"{TMP_PREFIX}{kind}-{secrets.token_hex(8)}@{os.getpid()}@{socket.gethostname()}"


def tmp_is_leftover(path: Path) -> bool:
    """Whether a `.tmp-*` entry was abandoned: its writer was a process on this host that no
    longer runs, or it is older than STALE_TMP_SECONDS (a live pid may be a reused one), or
    it does not say who wrote it."""
    parts = path.name.split("@")
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    pid, host = int(parts[1]), parts[2]
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    # Alive on this host (possibly a reused pid after a container restart) or another host's.
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return False  # its writer finished with it just now
    return age > STALE_TMP_SECONDS


def content_digest(config_sha256: str, weights_sha256: str) -> str:
    """The adapter's identity, 'sha256:<hex>' over the two files' sha256 digests (the store's
    manifests and the engine's reads both compute it here, so they agree)."""
    inner = bytes.fromhex(config_sha256) + bytes.fromhex(weights_sha256)
    return "sha256:" + hashlib.sha256(inner).hexdigest()


@dataclass(frozen=True)
class FileDigest:
    """One file of an adapter version: its name in the version directory, hex sha256, size."""

    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Manifest:
    """What the store knows about one published adapter; saved as manifest.json next to its
    files. `r`, `lora_alpha` and `target_modules` (the modules actually present, not the PEFT
    regex) come from the engine's validation; the store records them without interpreting."""

    adapter_id: str
    """'<tenant>/<name>' (saved as "name" in manifest.json, the format's first spelling)."""
    files: tuple[FileDigest, ...]
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_fingerprint: str
    size_bytes: int
    created_time: str
    """RFC 3339, UTC."""
    source: str
    """'register', 'upload' or 'trainer'."""
    training: dict | None = None
    """For an adapter the trainer published straight into the store: its report (dataset,
    hyperparameters, metrics, peak memory, versions)."""

    def __post_init__(self) -> None:
        split_adapter_id(self.adapter_id)
        if sorted(f.name for f in self.files) != sorted(ADAPTER_FILES):
            raise InvalidArgument(f"manifest files must be {', '.join(ADAPTER_FILES)}, "
                                  f"got {', '.join(f.name for f in self.files) or 'none'}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InvalidArgument(f"r must be a positive integer, got {self.r!r}")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha)):
            raise InvalidArgument(f"lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not all(isinstance(m, str) and m for m in self.target_modules):
            raise InvalidArgument("target_modules must be non-empty module names")
        if self.source not in SOURCES:
            raise InvalidArgument(f"source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.size_bytes != sum(f.size_bytes for f in self.files):
            raise InvalidArgument(f"size_bytes {self.size_bytes} is not the sum of the file sizes")

    @property
    def digest(self) -> str:
        """'sha256:<hex>' identifying the content; equal digests mean equal adapters."""
        by_name = {f.name: f.sha256 for f in self.files}
        return content_digest(by_name[CONFIG_FILE], by_name[WEIGHTS_FILE])

    def to_json(self) -> bytes:
        fields = asdict(self)
        body = {"format_version": MANIFEST_FORMAT, "name": fields.pop("adapter_id"), **fields}
        if body["training"] is None:  # only the trainer's adapters carry a report
            del body["training"]
        return (json.dumps(body, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse manifest.json; ValueError (with a reason fit for a log) on anything malformed."""
        try:
            body = json.loads(data.decode("utf-8"))
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004 - ValueError is the one error here
            version = body.pop("format_version", None)
            if version != MANIFEST_FORMAT:
                raise ValueError(f"format_version {version!r} is not {MANIFEST_FORMAT}")
            files = tuple(FileDigest(str(f["name"]), str(f["sha256"]), int(f["size_bytes"])) for f in body.pop("files"))
            return cls(adapter_id=body.pop("name"), files=files, target_modules=tuple(body.pop("target_modules")),
                       **body)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, InvalidArgument) as exc:
            raise ValueError(str(exc)) from None


# ---- durable file operations ---------------------------------------------------------------
@contextlib.contextmanager
def store_full_is_resource_exhausted() -> Iterator[None]:
    """A write that finds the store's disk (or the caller's quota on it) full raises
    ResourceExhausted, a status a client can act on, instead of an OSError; the caller removes
    what it had written."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted("the adapter store is full (no space left on its disk); "
                                    "remove adapters or ask the operator for more space") from None
        raise


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (creations, renames) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) holding `data`, fsync'd. The directory entry is made
    durable by the caller's fsync_dir of the parent, once for all the files it writes."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def swap_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` (a name in the same directory) atomically: a new symlink is
    made under a temporary name and renamed over `link`, which POSIX rename does atomically,
    so a reader (or a crash) sees the old target or the new one, never no link."""
    tmp = link.with_name(new_tmp_name("link"))
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


# ---- copying and verifying content -------------------------------------------------------
CHUNK_BYTES = 1 << 20  # copy/hash granularity: bounded memory for multi-GB files


def chunks(source: bytes | Path) -> Iterator[bytes]:
    """The bytes of `source` (contents, or a file to read) in bounded pieces."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for start in range(0, len(view), CHUNK_BYTES):
            yield view[start:start + CHUNK_BYTES]
        return
    with open(source, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def copy_in_durably(dst: Path, source: bytes | Path, size: int, label: str) -> FileDigest:
    """Write `source` to new file `dst`, fsync'd, hashing it on the way (one read of the
    source, so the digest is of exactly the bytes stored). A source that is not `size` bytes
    any more changed while being read, and is refused rather than half-trusted."""
    digest = hashlib.sha256()
    written = 0
    with open(dst, "xb") as out:
        for chunk in chunks(source):
            written += len(chunk)
            if written > size:
                break
            digest.update(chunk)
            out.write(chunk)
        if written != size:
            raise AdapterIncompatible(f"{label} changed while it was being copied; try again")
        out.flush()
        os.fsync(out.fileno())
    return FileDigest(dst.name, digest.hexdigest(), size)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in bounded pieces."""
    digest = hashlib.sha256()
    for chunk in chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def verify_version(name: str, version_dir: Path, hashes: bool = True) -> Manifest:
    """The version's manifest after checking every file against it (names and sizes, and the
    sha256 of the contents when `hashes`); ValueError saying what does not match."""
    manifest_path = version_dir / MANIFEST_FILE
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise ValueError(f"{MANIFEST_FILE} is missing")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{MANIFEST_FILE} is over {MAX_MANIFEST_BYTES:,} bytes")
    try:
        manifest = Manifest.from_json(manifest_path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{MANIFEST_FILE} is malformed ({exc})") from None
    if manifest.adapter_id != name:
        raise ValueError(f"{MANIFEST_FILE} names adapter {manifest.adapter_id!r}")
    for f in manifest.files:
        path = version_dir / f.name
        if not path.is_file() or path.is_symlink():
            raise ValueError(f"{f.name} is missing")
        size = path.stat().st_size
        if size != f.size_bytes:
            raise ValueError(f"{f.name} is {size:,} bytes, its manifest says {f.size_bytes:,}")
        if hashes and file_sha256(path) != f.sha256:
            raise ValueError(f"{f.name} does not match the sha256 in its manifest")
    return manifest
