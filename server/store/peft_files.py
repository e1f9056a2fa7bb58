"""Reads one adapter directory in PEFT layout (adapter_config.json + adapter_model.safetensors).

Only safetensors is read: a pickled `adapter_model.bin` can run code when loaded, so it is
refused and never opened. The config is parsed as plain JSON data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from loraserve.errors import AdapterIncompatible
from loraserve.store.adapter_config import AdapterConfig
from loraserve.store.layout import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402  (one definition, torch-free)

PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def read_adapter_dir(path: str | Path, name: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(adapter_config as a dict, tensors by key, content digest) of the adapter in `path`.
    The digest is sha256 over both files, so equal digests mean equal adapters. Errors name
    the adapter and the file, never the server path."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterIncompatible(f"adapter {name!r} has no {CONFIG_FILE}")
    if not weights_path.is_file():
        pickled = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickled:
            raise AdapterIncompatible(
                f"adapter {name!r} has only {pickled[0]} (pickle, which can run code); "
                f"convert it to {WEIGHTS_FILE}")
        raise AdapterIncompatible(f"adapter {name!r} has no {WEIGHTS_FILE}")
    config_bytes = config_path.read_bytes()
    weights_bytes = weights_path.read_bytes()
    digest = hashlib.sha256(hashlib.sha256(config_bytes).digest() + hashlib.sha256(weights_bytes).digest())
    config = AdapterConfig.from_bytes(config_bytes, name).raw
    try:
        tensors = load_safetensors(weights_bytes)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterIncompatible(f"adapter {name!r}: {WEIGHTS_FILE} is not a valid safetensors file ({exc})") from None
    return config, tensors, "sha256:" + digest.hexdigest()
