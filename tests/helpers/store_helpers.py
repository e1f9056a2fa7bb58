"""Helpers the adapter-store, import-root and safetensors-check tests share: small adapters and
safetensors files written by hand (fast, and the store never looks inside the tensors).
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from loraserve.store.layout import CONFIG_FILE, WEIGHTS_FILE

MB = 1 << 20


# ---- building adapters ---------------------------------------------------------------------
def st_bytes(header: object, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file written by hand: u64 header length, JSON header, data section."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def adapter_files(seed: int, weights_bytes: int = 4096) -> dict[str, bytes]:
    """A small valid adapter (one F32 tensor pair) whose content depends on `seed`."""
    n = weights_bytes // 8  # two F32 tensors of n/... elements each
    data = random.Random(seed).randbytes(8 * n)
    header = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": {
                  "dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
              "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": {
                  "dtype": "F32", "shape": [n], "data_offsets": [4 * n, 8 * n]}}
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "seed": seed}
    return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: st_bytes(header, data)}


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path
