"""`loraserve export-merged`: the base with one adapter merged in, for single-task deployments.

The adapter is merged into the base's full-precision weights, never into 4-bit ones: merging
into NF4 blocks would need a re-quantization that changes every weight of the layer. An
adapter trained with QLoRA on the NF4 base is therefore merged into the original checkpoint
(which the NF4 base is the quantization of), as QLoRA prescribes; quantize the merged model
again at load time if you serve it quantized.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.errors import AdapterIncompatible
from loraserve.lora.peft_compat import keep_module_targets
from loraserve.store.layout import MANIFEST_FILE


def export_merged(model: str, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Write `<out_dir>`: a normal model directory (weights + tokenizer) with the adapter merged."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    base = load_base(BaseModelConfig(model, quantization="none", dtype=dtype))
    manifest_path = Path(adapter_dir) / MANIFEST_FILE
    if manifest_path.is_file():
        recorded = json.loads(manifest_path.read_text()).get("base_fingerprint")
        if recorded and recorded != base.fingerprint:
            raise AdapterIncompatible(f"the adapter was trained on base {recorded[:19]}..., not {base.fingerprint[:19]}...")
    with keep_module_targets():
        merged = PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():
            merged.save_pretrained(staging)
        base.tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
