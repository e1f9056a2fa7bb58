"""A base fingerprint: the identity of the exact base weights an adapter belongs to.

sha256 over config.json (a pre-quantized checkpoint's quantization_config included: it says how
its weights are read) and every weight file's content hash. Hashing tens of GB at every
start-up would cost minutes, so content hashes are cached per (path, size, mtime), and a file
that lives in a Hugging Face hub cache is named by its blob, whose name already is the
file's sha256, so it is never read at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_BLOB = re.compile(r"^[0-9a-f]{64}$")
_CACHE_FILE = Path(os.environ.get("LORASERVE_CACHE_DIR", Path.home() / ".cache" / "loraserve")) / "file_hashes.json"


def base_fingerprint(model_dir: str | Path) -> str:
    """'sha256:<hex>' identifying the config and weights in `model_dir`."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("transformers_version", None)  # saving with a newer library is not a new base
    digest.update(json.dumps(config, sort_keys=True).encode())
    weights = sorted(p for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise FileNotFoundError("the model directory holds no weight files")
    cache = _read_cache()
    for path in weights:
        digest.update(path.name.encode())
        digest.update(_file_sha256(path, cache).encode())
    _write_cache(cache)
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: Path, cache: dict[str, str]) -> str:
    resolved = path.resolve()
    if resolved.parent.name == "blobs" and _BLOB.match(resolved.name):
        return resolved.name
    stat = resolved.stat()
    key = f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in cache:
        h = hashlib.sha256()
        with open(resolved, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
    return cache[key]


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(_CACHE_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, str]) -> None:
    try:
        _CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, _CACHE_FILE)
    except OSError:  # a read-only home only costs a re-hash next time
        pass
