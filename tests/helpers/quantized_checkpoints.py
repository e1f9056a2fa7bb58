"""Pre-quantized checkpoints made from a synthetic base, laid out as real ones come: FP8 as
DeepSeek-V3/R1 ship it (float8_e4m3fn linear weights, one float32 `weight_scale_inv` per 128x128
block, `quantization_config` {quant_method: fp8} in config.json), and bitsandbytes NF4 as
`save_pretrained` writes a 4-bit model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def fp8_checkpoint(base: Path, out: Path) -> Path:
    """`base` with every linear weight of its decoder layers stored as block-scaled FP8."""
    shutil.copytree(base, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        for name in [n for n, t in tensors.items() if n.endswith("proj.weight") and t.dim() == 2]:
            weight, scale = _to_fp8(tensors[name].float())
            tensors[name] = weight
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
        save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def dequantized_fp8(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The float32 weights an FP8 checkpoint stands for (weight x its block's scale)."""
    out = {}
    for path in checkpoint.glob("*.safetensors"):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if name.endswith("weight_scale_inv"):
                continue
            scale = tensors.get(name.removesuffix("weight") + "weight_scale_inv")
            if scale is None:
                out[name] = tensor
                continue
            rows, cols = tensor.shape
            full = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
            out[name] = tensor.float() * full
    return out


def _to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    blocks = torch.nn.functional.pad(weight, (0, -cols % BLOCK, 0, -rows % BLOCK))
    blocks = blocks.view(blocks.shape[0] // BLOCK, BLOCK, blocks.shape[1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [rows / 128, cols / 128]
    full = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (weight / full).to(torch.float8_e4m3fn), scale.float()


def nf4_checkpoint(base: Path, out: Path) -> Path:
    """`base` loaded in bitsandbytes NF4 and saved: packed 4-bit weights and their quant state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out
