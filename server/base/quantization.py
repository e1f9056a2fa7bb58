"""How the base's weights are quantized: by bitsandbytes at load (`--quantization`), or already in
the checkpoint (DeepSeek-V3/R1 ship FP8 with a `quantization_config` in config.json; others come
as AWQ, GPTQ or bitsandbytes files).

A pre-quantized checkpoint is loaded as it comes: bitsandbytes cannot quantize it again
(transformers raises a ValueError when asked to), so `--quantization` must be `none` (the
weights as stored) or the checkpoint's own bitsandbytes kind, and a refusal says what to use.
What the base really runs as is reported by GetServerInfo.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from loraserve.config import BaseModelConfig
from loraserve.errors import ConfigError

# Architectures with MLA attention: kv_b_proj sees 4-D inputs, which bitsandbytes' int8 CPU
# kernel cannot take (it crashes), so that combination is refused up front.
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
BITSANDBYTES_KINDS = ("nf4", "fp4", "int8")


def checkpoint_quantization(hf_config) -> str | None:
    """How a pre-quantized checkpoint's weights are stored, from its config.json: its
    `quant_method` (fp8, awq, gptq...) or, for bitsandbytes files, the kind (nf4, fp4, int8);
    None for a checkpoint in plain floats."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    get = quant.get if isinstance(quant, dict) else (lambda key, default=None: getattr(quant, key, default))
    method = get("quant_method")
    method = str(getattr(method, "value", method) or "unknown")
    if method == "bitsandbytes":
        if get("load_in_8bit"):
            return "int8"
        return str(get("bnb_4bit_quant_type") or "nf4")
    return method


def describe(requested: str, stored: str | None) -> str:
    """The quantization the base runs with, as GetServerInfo reports it: `nf4`, `none`, or
    `fp8 (checkpoint)` for one that came quantized."""
    return f"{stored} (checkpoint)" if stored is not None else requested


def refuse_requantization(model: str, requested: str, stored: str | None, hint: str) -> None:
    """The one rule both engines apply to a pre-quantized checkpoint: `--quantization` must be
    `none` or the checkpoint's own kind; anything else is a ConfigError ending in `hint`."""
    if stored is not None and requested not in ("none", stored):
        raise ConfigError(f"the checkpoint {model} is already quantized ({stored}, in its config.json), so "
                          f"--quantization {requested} cannot be applied: {hint}")


def load_quantization(config: BaseModelConfig, model_type: str, stored: str | None,
                      dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """What to pass transformers as `quantization_config` for the native engine and the trainer
    (None: load the weights as stored); a request that cannot be met is one clear ConfigError."""
    requested = config.quantization
    if stored is not None:
        if stored in BITSANDBYTES_KINDS:
            hint = f"use --quantization none or {stored} (the weights as stored)"
        else:
            hint = ("use --quantization none (transformers runs its weights as stored: its own kernels on a GPU, "
                    "dequantized to the compute dtype on a CPU), or --engine vllm")
        refuse_requantization(config.model, requested, stored, hint)
        return None  # transformers reads the checkpoint's own quantization_config
    if requested == "none":
        return None
    if requested == "int8":
        if not torch.cuda.is_available() and model_type in MLA_MODEL_TYPES:
            raise ConfigError(
                f"quantization int8 is not supported on CPU for {model_type} (MLA attention): bitsandbytes' "
                "int8 CPU kernel cannot take MLA's 4-D inputs; use nf4, fp4 or none")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=requested,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
