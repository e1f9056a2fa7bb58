"""Adapters by name for the API: the store on disk is the source of truth, the engine serves
what the store holds. Every register/upload runs the full check — path inside an import root,
safetensors header against the base before any tensor is allocated, the engine's LoRA checks —
before anything is published. One lock orders publish and engine registration, so concurrent
register/unregister of one name can never leave the store and the engine disagreeing."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from server.engine.engine import ADAPTER_NAME, Engine
from server.errors import AdapterIncompatible, AdapterNotFound, InvalidArgument
from server.store.adapter_store import AdapterStore, Manifest
from server.store.import_roots import resolve_import_path
from server.store.peft_files import CONFIG_FILE, WEIGHTS_FILE
from server.store.safetensors_check import check_safetensors_header

log = logging.getLogger(__name__)
MAX_CONFIG_BYTES = 1024 * 1024
# Config keys that would make a loader import or run code (transformers' auto_map and friends).
CODE_KEYS = ("auto_map", "custom_code", "trust_remote_code")


@dataclass(frozen=True)
class AdapterStatus:
    manifest: Manifest
    tier: str
    pinned: bool


class AdapterRegistry:
    def __init__(self, engine: Engine, settings) -> None:
        self.engine = engine
        self.store = AdapterStore(Path(settings.adapters_dir), max_adapter_bytes=settings.max_adapter_bytes,
                                  max_store_bytes=settings.max_store_bytes or None)
        self.roots = [Path(r) for r in settings.import_roots]
        self.max_adapter_bytes = settings.max_adapter_bytes
        self._lock = threading.Lock()
        for problem in self.store.problems:
            log.error("adapter store: %s (not served)", problem)

    # ---- start-up ----------------------------------------------------------------------
    def load_store(self, preload: list[str], pin: list[str]) -> None:
        """Serve every adapter of the store built for this base; warm and pin as configured."""
        for manifest in self.store.list():
            if manifest.base_fingerprint and manifest.base_fingerprint != self.engine.base.fingerprint:
                log.error("adapter %s was built for base %s, not the served %s: not served", manifest.name,
                          manifest.base_fingerprint[:19], self.engine.base.fingerprint[:19])
                continue
            try:
                self.engine.add_adapter(manifest.name, self.store.path_of(manifest.name))
            except Exception as exc:  # a bad stored adapter must not keep the server from starting
                log.error("adapter %s in the store cannot be served: %s", manifest.name, exc)
        for name in pin:
            self.engine.pin_adapter(name)
        for name in preload:
            if name not in pin:
                self.engine.preload_adapter(name)

    # ---- checks ------------------------------------------------------------------------
    def _check_files(self, name: str, folder: Path) -> tuple[dict, int]:
        """Everything short of decoding tensors: config as plain data, size caps, header."""
        if not ADAPTER_NAME.match(name):
            raise InvalidArgument(f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' "
                                  "(at most 128, starting with a letter or digit)")
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not weights_path.is_file() and any((folder / p).exists() for p in ("adapter_model.bin", "adapter_model.pt")):
            raise AdapterIncompatible(f"adapter {name!r} has only a pickled adapter_model.bin; "
                                      f"convert it to {WEIGHTS_FILE} (pickles are never loaded)")
        if not config_path.is_file() or not weights_path.is_file():
            raise AdapterIncompatible(f"adapter {name!r} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        size = config_path.stat().st_size + weights_path.stat().st_size
        if size > self.max_adapter_bytes:
            from server.errors import ResourceExhausted

            raise ResourceExhausted(f"adapter {name!r} is {size:,} bytes, over the per-adapter limit of "
                                    f"{self.max_adapter_bytes:,}")
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} is over {MAX_CONFIG_BYTES:,} bytes")
        import json

        try:
            config = json.loads(config_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
        for key in CODE_KEYS:
            if key in config:
                raise AdapterIncompatible(f"adapter {name!r}: {CONFIG_FILE} has {key!r}, which would load code; "
                                          "refused")
        shapes = self.engine.lora_module_shapes()
        max_rank = self.engine.config.max_lora_rank
        check_safetensors_header(weights_path, max_bytes=self.max_adapter_bytes,
                                 expected_shapes=lambda key, shape: _expected(key, shape, shapes, max_rank, name))
        return config, size

    def validate(self, name: str, path: str) -> Manifest:
        """The manifest an adapter would get; publishes nothing."""
        folder = resolve_import_path(path, self.roots)
        return self._manifest_of(name, folder, "register")

    def _manifest_of(self, name: str, folder: Path, source: str) -> Manifest:
        config, _ = self._check_files(name, folder)
        weights, digest = self.engine.check_adapter(name, folder)
        return self.store.describe(name, folder, r=weights.rank, lora_alpha=float(config.get("lora_alpha", 0)),
                                   target_modules=sorted(weights.modules), base_fingerprint=self.engine.base.fingerprint,
                                   source=source)

    # ---- changes -----------------------------------------------------------------------
    def register(self, name: str, path: str, replace: bool) -> tuple[AdapterStatus, bool]:
        folder = resolve_import_path(path, self.roots)
        return self._publish(name, folder, replace, "register")

    def upload(self, name: str, files: dict[str, bytes], replace: bool) -> tuple[AdapterStatus, bool]:
        """Publish uploaded file contents after the same checks as `register`."""
        unknown = set(files) - {CONFIG_FILE, WEIGHTS_FILE}
        if unknown:
            raise InvalidArgument(f"only {CONFIG_FILE} and {WEIGHTS_FILE} may be uploaded, got {sorted(unknown)}")
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=self.store.scratch_dir()) as tmp:
            for file_name, data in files.items():
                (Path(tmp) / file_name).write_bytes(data)
            return self._publish(name, Path(tmp), replace, "upload")

    def _publish(self, name: str, folder: Path, replace: bool, source: str) -> tuple[AdapterStatus, bool]:
        manifest = self._manifest_of(name, folder, source)
        with self._lock:
            stored, created = self.store.publish(name, folder, manifest, replace=replace)
            self.engine.add_adapter(name, self.store.path_of(name), replace=True)
        return self.status(name, stored), created

    def unregister(self, name: str) -> None:
        with self._lock:
            self.store.remove(name)
            try:
                self.engine.remove_adapter(name)
            except AdapterNotFound:  # in the store but never served (e.g. built for another base)
                pass

    # ---- reads -------------------------------------------------------------------------
    def status(self, name: str, manifest: Manifest | None = None) -> AdapterStatus:
        manifest = manifest or self.store.get(name)
        try:
            tier, pinned = self.engine.adapter_tier(name)
        except AdapterNotFound:
            tier, pinned = "disk", False
        return AdapterStatus(manifest, tier, pinned)

    def list(self) -> list[AdapterStatus]:
        return [self.status(m.name, m) for m in self.store.list() if self.engine.has_adapter(m.name)]

    def get(self, name: str) -> AdapterStatus:
        if not self.engine.has_adapter(name):
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return self.status(name)

    def pin(self, name: str) -> None:
        self.engine.pin_adapter(name)

    def unpin(self, name: str) -> None:
        self.engine.unpin_adapter(name)


def _expected(key: str, shape: list[int], shapes: dict[str, tuple[int, int]], max_rank: int, name: str) -> None:
    """Header-level shape check of one tensor against the base (before anything is allocated)."""
    prefix, suffix = "base_model.model.", (".lora_A.weight", ".lora_B.weight")
    if not key.startswith(prefix) or not key.endswith(suffix):
        return None  # the engine's parser names unexpected keys precisely
    module = key[len(prefix):-len(suffix[0])]
    if module not in shapes:
        return None  # likewise: it explains why the module cannot be targeted
    in_features, out_features = shapes[module]
    if len(shape) != 2:
        raise AdapterIncompatible(f"adapter {name!r}: {key} has {len(shape)} dimensions, expected 2")
    r = shape[0] if key.endswith(suffix[0]) else shape[1]
    other = shape[1] if key.endswith(suffix[0]) else shape[0]
    expected_other = in_features if key.endswith(suffix[0]) else out_features
    if other != expected_other or r > max_rank or r < 1:
        raise AdapterIncompatible(f"adapter {name!r}: {key} has shape {tuple(shape)}, which does not fit this "
                                  f"base (needs {expected_other} features and a rank of 1..{max_rank})")
    return None
