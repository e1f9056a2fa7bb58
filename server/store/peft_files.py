"""Reads one adapter directory in PEFT layout (adapter_config.json + adapter_model.safetensors).

Only safetensors is read: a pickled `adapter_model.bin` can run code when loaded, so it is
refused and never opened. The config is parsed as plain JSON data (`AdapterConfig`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from loraserve.errors import AdapterIncompatible
from loraserve.store.adapter_config import AdapterConfig
from loraserve.store.layout import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, content_digest


def read_adapter_dir(path: str | Path, adapter_id: str, config: AdapterConfig | None = None,
                     digest: str | None = None) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """(config, tensors by name, content digest) of the adapter in `path`. The digest is sha256
    over both files' sha256, so equal digests mean equal adapters. Given `config` and `digest`
    (what admission already established for files the store wrote itself), neither is computed
    again and only the tensors are read. Errors name the adapter and the file, never the path."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterIncompatible(f"adapter {adapter_id!r} has no {CONFIG_FILE}")
    if not weights_path.is_file():
        pickled = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickled:
            raise AdapterIncompatible(
                f"adapter {adapter_id!r} has only {pickled[0]} (pickle, which can run code); "
                f"convert it to {WEIGHTS_FILE}")
        raise AdapterIncompatible(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}")
    try:
        if config is not None and digest is not None:
            return config, load_file(weights_path), digest
        # Hashed and parsed from the same bytes, so the digest is of exactly what is served.
        config_bytes = config_path.read_bytes()
        weights_bytes = weights_path.read_bytes()
        digest = content_digest(hashlib.sha256(config_bytes).hexdigest(), hashlib.sha256(weights_bytes).hexdigest())
        config = AdapterConfig.from_bytes(config_bytes, adapter_id)
        return config, load_safetensors(weights_bytes), digest
    except AdapterIncompatible:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterIncompatible(f"adapter {adapter_id!r}: {WEIGHTS_FILE} is not a valid safetensors file "
                                  f"({exc})") from None
