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
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loraserve.base.fingerprint import base_fingerprint
from loraserve.base.moe_experts import quantize_routed_experts
from loraserve.base.placement import (
    choose_placement,
    distributed_local_rank,
    estimate_weight_bytes,
    visible_gpu_free_bytes,
)
from loraserve.base.quantization import checkpoint_quantization, describe, load_quantization
from loraserve.base.tokenizer import load_tokenizer
from loraserve.config import BaseModelConfig
from loraserve.errors import ConfigError

log = logging.getLogger(__name__)

@dataclass
class LoadedBase:
    """A base ready to run: the model in eval mode, its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: BaseModelConfig
    model_dir: Path
    fingerprint: str
    dtype: torch.dtype
    quantization: str = "none"
    """What the weights run as: the --quantization applied at load, or `<method> (checkpoint)`."""

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


def load_base(config: BaseModelConfig, for_training: bool = False) -> LoadedBase:
    """Load the base named by `config`; in eval mode with frozen weights unless for training."""
    model_dir = resolve_model_dir(config.model)
    dtype = compute_dtype(config)
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    stored = checkpoint_quantization(hf_config)
    quant = load_quantization(config, hf_config.model_type, stored, dtype)
    quantization = describe(config.quantization, stored)
    gpus = visible_gpu_free_bytes()
    weights = estimate_weight_bytes(model_dir, config.quantization, str(dtype).removeprefix("torch.")) if gpus else None
    placement = choose_placement(config.device_map, weights, gpus, distributed_local_rank() if for_training else None)
    device_map = placement.device_map
    log.info("loading base %s (%s, quantization=%s, dtype=%s, device_map=%s: %s)", model_dir.name,
             hf_config.model_type, quantization, dtype, device_map, placement.reason)
    # quantization_config=None, passed, would override a pre-quantized checkpoint's own (its
    # packed weights then fail to load): only a bitsandbytes config to apply is passed.
    quantize = {} if quant is None else {"quantization_config": quant}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=device_map, trust_remote_code=config.trust_remote_code, **quantize)
    # bitsandbytes only replaces nn.Linear: the fused routed experts are quantized here, per expert.
    quantize_routed_experts(model, config.quantization, quant)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return LoadedBase(model=model, tokenizer=tokenizer, config=config, model_dir=model_dir,
                      fingerprint=base_fingerprint(model_dir), dtype=dtype, quantization=quantization)
