"""The base's tokenizer, loaded so that it encodes what the checkpoint's files say.

Two faults of transformers 5 with real DeepSeek tokenizer files, both silent, are corrected here
once for the server (both engines) and the trainer:

- DeepSeek's tokenizer_config.json names `LlamaTokenizerFast`, but tokenizer.json is a byte-level
  BPE. transformers 5 builds `LlamaTokenizer`, whose constructor installs a SentencePiece
  `Metaspace` pre-tokenizer and decoder over the file's (huggingface/transformers#45488, open):
  spaces vanish and "你好" encodes to nothing. When the loaded pipeline differs from
  tokenizer.json's, the tokenizer is reloaded through the generic class, which keeps the file's.
- transformers 5 drops `add_bos_token` from tokenizer_config.json when a tokenizer.json exists,
  and DeepSeek's post-processor adds no BOS, so raw prompts lost the BOS the models were trained
  with. When the config asks for it (`add_bos_token: true`), BOS is added to every encoding with
  special tokens (chat templates write their own BOS into the text and are encoded without).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

_PIPELINE = ("pre_tokenizer", "decoder")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The base's tokenizer with its chat template (a pad token set to EOS where it has none)."""
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    saved = _read_json(model_dir / "tokenizer.json")
    if saved is not None and _pipeline_differs(tokenizer, saved):
        log.warning("%s overrides tokenizer.json's %s (a transformers 5 fault with byte-level BPE files "
                    "labelled LlamaTokenizerFast); loading tokenizer.json as written",
                    type(tokenizer).__name__, " and ".join(_PIPELINE))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if _wants_bos(model_dir) and not starts_with_bos(tokenizer):
        tokenizer.add_bos_token = True  # installs a post-processor that prepends BOS
        if not starts_with_bos(tokenizer):
            raise ValueError(f"the tokenizer in {model_dir} asks for a BOS token (add_bos_token) but cannot add one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def starts_with_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a raw prompt encoded with special tokens begins with the BOS token."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos is not None and bool(ids) and ids[0] == bos


def _wants_bos(model_dir: Path) -> bool:
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    return config.get("add_bos_token") is True


def _pipeline_differs(tokenizer: PreTrainedTokenizerBase, saved: dict) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing built from tokenizer.json to compare
        return False
    loaded = json.loads(backend.to_str())
    return any(saved.get(part) is not None and loaded.get(part) != saved.get(part) for part in _PIPELINE)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
