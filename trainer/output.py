"""Writing a finished adapter: PEFT's two files plus manifest.json, atomically.

The adapter is saved into a temporary sibling directory and renamed into place only when
complete, so bad data, a crash or Ctrl-C never leave a partial adapter where a server or an
operator would pick it up; a previous adapter of the same name is replaced only at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from server.store.layout import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, fsync_dir, write_durably


def write_adapter(peft_model, output_dir: str | Path, name: str, manifest: dict) -> Path:
    """Save `peft_model`'s adapter as `<output_dir>/<name>/` and return that path."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-train-{name}-{uuid.uuid4().hex[:8]}"
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for extra in tmp.iterdir():  # PEFT also writes a model card; the store takes the two files
            if extra.name not in (CONFIG_FILE, WEIGHTS_FILE):
                extra.unlink()
        write_durably(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            with open(tmp / file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        old = None
        if final.exists():
            old = root / f".tmp-old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
