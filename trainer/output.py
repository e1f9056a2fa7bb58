"""Writing a finished adapter atomically: PEFT's two files plus a manifest.

Two destinations:
- a plain directory: the adapter becomes `<output_dir>/<name>/` (the two files and the
  trainer's manifest.json), saved in a temporary sibling and renamed into place only when
  complete, so bad data, a crash or Ctrl-C never leave a partial adapter where a server or
  an operator would pick it up;
- a server's adapter store (a directory holding the store's `.lock`): the adapter is
  published through `AdapterStore`, the same stage-and-commit a registration uses, so it is
  safe next to running servers; they serve it on the next request for it or store sync.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors import safe_open

from loraserve.base.moe_experts import EXPERT_WEIGHTS
from loraserve.lora.peft_compat import loadable_targets
from loraserve.store.adapter_config import AdapterConfig
from loraserve.store.adapter_store import AdapterStore
from loraserve.store.layout import (
    CONFIG_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    adapter_id,
    fsync_dir,
    new_tmp_name,
    write_durably,
)
from loraserve.store.peft_names import PREFIX, WRAPPER, lora_modules, unwrapped

# The trainer's own bound; a server still applies its --max-adapter-bytes when it loads one.
MAX_TRAINED_ADAPTER_BYTES = 64 * 1024**3


def is_store(path: str | Path) -> bool:
    """Whether `path` is an adapter store (a server has opened it) rather than a plain folder."""
    return (Path(path) / LOCK_FILE).is_file()


def write_adapter(peft_model, output_dir: str | Path, name: str, manifest: dict, tenant: str = "default") -> Path:
    """Save `peft_model`'s adapter under `output_dir` and return its directory (in a store,
    the adapter belongs to `tenant`)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    in_store = is_store(root)
    # In a store, a `.tmp-*` name with our pid and host keeps another process's start-up
    # from deleting the adapter while it is being saved.
    tmp = root / (new_tmp_name("train") if in_store else f".tmp-train-{name}-{uuid.uuid4().hex[:8]}")
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for extra in tmp.iterdir():  # PEFT also writes a model card; an adapter is the two files
            if extra.name not in (CONFIG_FILE, WEIGHTS_FILE):
                extra.unlink()
        experts = _expert_targets(peft_model) | _rename_fourbit_expert_tensors(peft_model, tmp)
        _name_trained_modules(peft_model, tmp, experts)
        if in_store:
            return _publish(root, tmp, adapter_id(tenant, name), manifest, experts)
        write_durably(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            with open(tmp / file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        final = root / name
        old = None
        if final.exists():
            old = root / f".tmp-old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _expert_targets(peft_model) -> dict[str, str]:
    """Routed-expert LoRA of `peft_model`: the module its tensors are saved under (PEFT's nested
    ParamWrappers: `<experts>.base_layer`, `<experts>`) -> `<experts>.<parameter>`."""
    targets = {}
    for name, module in peft_model.named_modules():
        parameter = getattr(module, "parameter_name", None)
        if type(module).__name__ == "ParamWrapper" and parameter in EXPERT_WEIGHTS:
            saved = name.removeprefix(PREFIX)
            targets[saved] = f"{unwrapped(saved)[0]}.{parameter}"
    return targets


def _rename_fourbit_expert_tensors(peft_model, saved: Path) -> dict[str, str]:
    """Rewrite the QLoRA expert layers' tensors (trainer/expert_lora.py: gate_up_proj's as
    `lora_A`/`lora_B`, down_proj's as `lora_down_A`/`lora_down_B`) under the names PEFT's
    ParamWrapper saves (`<experts>.base_layer.lora_*` and `<experts>.lora_*`), the same values
    in the same layout; the `_expert_targets` entries for them."""
    from safetensors.torch import load_file, save_file

    from loraserve.trainer.expert_lora import DOWN_A, DOWN_B, FourBitExpertsLora

    modules = [name.removeprefix(PREFIX) for name, m in peft_model.named_modules() if isinstance(m, FourBitExpertsLora)]
    if not modules:
        return {}
    tensors = load_file(saved / WEIGHTS_FILE)
    renamed, targets = dict(tensors), {}
    for experts in modules:
        key = {layer: f"{PREFIX}{experts}.{layer}.weight" for layer in ("lora_A", "lora_B", DOWN_A, DOWN_B)}
        for name in key.values():
            del renamed[name]
        for which, gate_up, down in (("A", "lora_A", DOWN_A), ("B", "lora_B", DOWN_B)):
            renamed[f"{PREFIX}{experts}{WRAPPER}.lora_{which}.weight"] = tensors[key[gate_up]]
            renamed[f"{PREFIX}{experts}.lora_{which}.weight"] = tensors[key[down]]
        targets[f"{experts}{WRAPPER}"] = f"{experts}.gate_up_proj"
        targets[experts] = f"{experts}.down_proj"
    save_file(renamed, saved / WEIGHTS_FILE, metadata={"format": "pt"})
    return targets


def _name_trained_modules(peft_model, saved: Path, experts: dict[str, str]) -> None:
    """Rewrite the saved config's targets as the exact modules whose LoRA tensors were saved,
    in the form plain PEFT loads as trained (see `loadable_targets`): the training regex would
    be reduced to leaf names and, on DeepSeek V2/V3, re-aimed at the routed experts. Routed-expert
    LoRA is named by its parameters (`<experts>.gate_up_proj`), as PEFT matches them."""
    with safe_open(saved / WEIGHTS_FILE, "pt") as f:
        modules = [m for m in lora_modules(f.keys()) if m not in experts]
    config = json.loads((saved / CONFIG_FILE).read_text())
    config.update(loadable_targets(peft_model.get_base_model(), modules))
    if experts:
        config["target_parameters"] = (config["target_parameters"] or []) + sorted(experts.values())
        config["lora_dropout"] = 0.0
    (saved / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _publish(root: Path, saved: Path, name: str, manifest: dict, experts: dict[str, str]) -> Path:
    config = AdapterConfig.from_bytes((saved / CONFIG_FILE).read_bytes(), name)
    with safe_open(saved / WEIGHTS_FILE, "pt") as f:
        modules = sorted(experts.get(m, m) for m in lora_modules(f.keys()))
    store = AdapterStore(root, max_adapter_bytes=MAX_TRAINED_ADAPTER_BYTES)
    store.publish(name, {f: saved / f for f in (CONFIG_FILE, WEIGHTS_FILE)}, r=config.r,
                  lora_alpha=config.lora_alpha, target_modules=modules,
                  base_fingerprint=manifest["base_fingerprint"], source="trainer", replace=True, training=manifest)
    return store.path_of(name)
