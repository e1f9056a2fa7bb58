"""Loads a base model the same way for the server and the trainer: quantization through
bitsandbytes, placement through accelerate, the tokenizer with its chat template, and the
fingerprint that ties adapters to this exact base."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loraserve.base.fingerprint import base_fingerprint
from loraserve.base.tokenizer import load_tokenizer
from loraserve.config import BaseModelConfig
from loraserve.errors import ConfigError

log = logging.getLogger(__name__)

# Architectures with MLA attention: kv_b_proj sees 4-D inputs, which bitsandbytes' int8 CPU
# kernel cannot take (it crashes), so that combination is refused up front.
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass
class LoadedBase:
    """A base ready to run: the model in eval mode, its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: BaseModelConfig
    model_dir: Path
    fingerprint: str
    dtype: torch.dtype

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def resolve_model_dir(model: str) -> Path:
    """A local directory as it is; anything else is a hub id fetched into the hub cache (the
    same code path as a local checkpoint from then on)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise ConfigError(f"model {model!r} is not a model directory")
    from huggingface_hub import snapshot_download  # only a hub id needs the network

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.model", "*.txt"]))


def compute_dtype(config: BaseModelConfig) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def quantization_config(config: BaseModelConfig, model_type: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """transformers' BitsAndBytesConfig for the chosen quantization (None for `none`)."""
    if config.quantization == "none":
        return None
    if config.quantization == "int8":
        if not torch.cuda.is_available() and model_type in MLA_MODEL_TYPES:
            raise ConfigError(
                f"quantization int8 is not supported on CPU for {model_type} (MLA attention): bitsandbytes' "
                "int8 CPU kernel cannot take MLA's 4-D inputs; use nf4, fp4 or none")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantization,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_base(config: BaseModelConfig, for_training: bool = False) -> LoadedBase:
    """Load the base named by `config`; in eval mode with frozen weights unless for training."""
    model_dir = resolve_model_dir(config.model)
    dtype = compute_dtype(config)
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    quant = quantization_config(config, hf_config.model_type, dtype)
    if config.device_map == "auto":
        device_map: str | dict = "auto" if torch.cuda.is_available() else "cpu"
    else:
        device_map = config.device_map
    log.info("loading base %s (%s, quantization=%s, dtype=%s, device_map=%s)", model_dir.name,
             hf_config.model_type, config.quantization, dtype, device_map)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quant, device_map=device_map,
        trust_remote_code=config.trust_remote_code)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return LoadedBase(model=model, tokenizer=tokenizer, config=config, model_dir=model_dir,
                      fingerprint=base_fingerprint(model_dir), dtype=dtype)
