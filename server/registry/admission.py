"""Admission: every check an incoming adapter passes before it is published, in one pass.

An adapter arrives as a directory under an import root (RegisterAdapter) or as an upload. Its
files are staged inside the store first (`loraserve.store.staging`), which copies and hashes them
once, parses the config once (`AdapterConfig`) and checks the safetensors header once, before any
tensor is allocated. Admission then checks what staging found against the served base — the
header's shapes, the base a trainer recorded — and hands the staged copy to the engine with the
config and digest already known, so the engine decodes the tensors without hashing or parsing
anything again. What was checked is exactly what is published: the staged copy is private to the
store, and the commit that follows renames it into place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraserve.engine.contract import AdmittedFiles, CheckedAdapter, Engine
from loraserve.errors import AdapterIncompatible
from loraserve.store.import_roots import resolve_import_path
from loraserve.store.layout import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    PICKLE_FILES,
    WEIGHTS_FILE,
    split_adapter_id,
)
from loraserve.store.peft_names import parse_lora_name, unwrapped
from loraserve.store.staging import StagedAdapter


@dataclass(frozen=True)
class Admitted:
    """What admission learned about a staged adapter: the manifest's fields, and the engine's
    check, handed back to it when the adapter is added so nothing is decoded twice."""

    lora_alpha: float
    adapter: CheckedAdapter

    @property
    def r(self) -> int:
        return self.adapter.rank

    @property
    def target_modules(self) -> tuple[str, ...]:
        return self.adapter.modules


def source_files(adapter_id: str, path: str, roots: Sequence[Path], base_fingerprint: str) -> dict[str, Path]:
    """The two files of the adapter directory `path` (under an import root) to stage. A pickled
    weights file is refused without being opened; a directory whose manifest.json (written by the
    trainer or another store) names another base is refused before anything else is read."""
    split_adapter_id(adapter_id)
    folder = resolve_import_path(path, roots)
    if not (folder / WEIGHTS_FILE).is_file() and any((folder / p).exists() for p in PICKLE_FILES):
        raise AdapterIncompatible(f"adapter {adapter_id!r} has only a pickled weights file; convert it to "
                                  f"{WEIGHTS_FILE} (pickles are never loaded)")
    _check_source_manifest(adapter_id, folder, base_fingerprint)
    return {CONFIG_FILE: folder / CONFIG_FILE, WEIGHTS_FILE: folder / WEIGHTS_FILE}


def admit(staged: StagedAdapter, engine: Engine, keep: bool) -> Admitted:
    """Every check of a staged adapter against the served base; with `keep`, the engine holds the
    decoded weights for the `add_adapter` that follows (a validation alone keeps nothing)."""
    shapes = engine.base.lora_module_shapes
    experts = engine.base.lora_expert_shapes
    max_rank = engine.config.max_lora_rank
    for name, header in staged.headers.items():  # still nothing allocated: shapes come from the header
        check_shape(name, tuple(header.shape), shapes, max_rank, staged.adapter_id, experts)
    checked = engine.check_adapter(staged.adapter_id, staged.path, keep=keep,
                                   admitted=AdmittedFiles(staged.config, staged.digest))
    return Admitted(staged.config.lora_alpha, checked)


def check_shape(name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, int]], max_rank: int,
                adapter_id: str, expert_shapes: dict[str, tuple[int, int, int]] | None = None) -> None:
    """Header-level check of one tensor against the base, before anything is allocated. Names
    the engine explains better (unexpected tensors, modules without slots) pass here. A routed-
    expert tensor (`<experts>[.base_layer].lora_A`, see lora.adapter.expert_parameter_names) must
    fit one of that experts module's parameters, E x rank 1..max_rank."""
    lora = parse_lora_name(name)
    if lora is None:
        return
    if lora.module in shapes:
        options = [(*shapes[lora.module], 1)]
    else:
        experts, _ = unwrapped(lora.module)
        options = [dims for param, dims in (expert_shapes or {}).items() if param.rpartition(".")[0] == experts]
        if not options:
            return
    if len(shape) != 2:
        raise AdapterIncompatible(f"adapter {adapter_id!r}: {name} has {len(shape)} dimensions, expected 2")
    rows, features = (shape[0], shape[1]) if lora.which == "A" else (shape[1], shape[0])
    for in_features, out_features, count in options:
        needed = in_features if lora.which == "A" else out_features
        if features == needed and rows % count == 0 and 1 <= rows // count <= max_rank:
            return
    in_features, out_features, count = options[0]
    needed = " or ".join(sorted({str(o[0] if lora.which == "A" else o[1]) for o in options}))
    per = f"{count} experts x " if count > 1 else ""
    raise AdapterIncompatible(f"adapter {adapter_id!r}: {name} has shape {tuple(shape)}, which does not fit "
                              f"this base (needs {needed} features and {per}a rank of 1..{max_rank})")


def _check_source_manifest(adapter_id: str, folder: Path, base_fingerprint: str) -> None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_bytes()[:MAX_MANIFEST_BYTES]).get("base_fingerprint", "")
    except (ValueError, AttributeError):
        raise AdapterIncompatible(f"adapter {adapter_id!r}: {MANIFEST_FILE} is not a valid manifest") from None
    if recorded and recorded != base_fingerprint:
        raise AdapterIncompatible(f"adapter {adapter_id!r} was built for base {str(recorded)[:19]}..., not the "
                                  f"served base {base_fingerprint[:19]}...")
