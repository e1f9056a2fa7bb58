"""One adapter decoded for serving: per-module A/B tensors and scaling, checked against the base.

PEFT stays the reference for the format: its `LoraConfig` fields and its rank/alpha pattern
matching are used as they are, and every feature our batched layers cannot reproduce exactly is
refused here with the adapter name, the field and the values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from peft.utils.other import get_pattern_key

from server.errors import AdapterIncompatible
from server.lora.wrapping import UNSUPPORTED_MODULES

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Config fields that switch on a LoRA variant we do not serve, with how we describe them.
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (extra full-weight modules)",
    "target_parameters": "target_parameters (routed MoE expert weights)",
    "trainable_token_indices": "trainable_token_indices (embedding rows)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layout)",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


@dataclass
class ModuleLora:
    """A ([r, in]) and B ([out, r]) of one target module, and its scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


@dataclass
class LoraWeights:
    """An adapter ready to copy into slots (host memory, engine dtype)."""

    name: str
    modules: dict[str, ModuleLora]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def parse_adapter(name: str, config: dict, tensors: dict[str, torch.Tensor],
                  base_shapes: dict[str, tuple[int, int]], max_rank: int,
                  dtype: torch.dtype) -> LoraWeights:
    """Check a PEFT LoRA adapter against the served base and decode it.

    `base_shapes` maps every module that has LoRA slots to its (in_features, out_features).
    """
    _check_config(name, config, max_rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterIncompatible(_describe_unexpected_key(name, key))
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterIncompatible(f"adapter {name!r} holds no LoRA weights")
    modules: dict[str, ModuleLora] = {}
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, pair in sorted(pairs.items()):
        _check_module(name, module, pair, base_shapes)
        a, b = pair["A"], pair["B"]
        r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"]))
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"]))
        in_features, out_features = base_shapes[module]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterIncompatible(
                f"adapter {name!r}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected ({r}, {in_features}) and ({out_features}, {r}) for r={r} on this base")
        if r > max_rank:
            raise AdapterIncompatible(f"adapter {name!r}: LoRA rank {r} of {module} is greater than max_lora_rank {max_rank}")
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterIncompatible(f"adapter {name!r}: module {module} has non-float weights ({a.dtype})")
        scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        modules[module] = ModuleLora(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scaling)
    return LoraWeights(name=name, modules=modules, rank=max(m.a.shape[0] for m in modules.values()))


def _check_config(name: str, config: dict, max_rank: int) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterIncompatible(f"adapter {name!r}: peft_type is {peft_type!r}, only LORA is served")
    for field, what in _REFUSED_FLAGS.items():
        if config.get(field):
            raise AdapterIncompatible(f"adapter {name!r}: {what} is not supported ({field}={config[field]!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterIncompatible(f"adapter {name!r}: bias={bias!r} is not supported, only bias='none'")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterIncompatible(f"adapter {name!r}: {field} must be a positive number, got {value!r}")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterIncompatible(f"adapter {name!r}: LoRA rank {max(ranks)} is greater than max_lora_rank {max_rank}")


def _check_module(name: str, module: str, pair: dict[str, torch.Tensor],
                  base_shapes: dict[str, tuple[int, int]]) -> None:
    parts = module.split(".")
    for part in parts:
        if part in UNSUPPORTED_MODULES:
            raise AdapterIncompatible(
                f"adapter {name!r} targets {module}: {UNSUPPORTED_MODULES[part]}")
    if module not in base_shapes:
        raise AdapterIncompatible(
            f"adapter {name!r} targets {module}, which this base does not have (or which has no LoRA slots)")
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise AdapterIncompatible(f"adapter {name!r}: module {module} has no {missing} weight")


def _describe_unexpected_key(name: str, key: str) -> str:
    if "lora_embedding" in key:
        return f"adapter {name!r}: embedding LoRA ({key}) is not supported"
    if "lora_magnitude_vector" in key:
        return f"adapter {name!r}: DoRA weights ({key}) are not supported"
    if key.endswith(".bias"):
        return f"adapter {name!r}: LoRA bias ({key}) is not supported"
    return f"adapter {name!r}: unexpected tensor {key!r}; expected base_model.model.<module>.lora_A/lora_B.weight"
