"""One adapter decoded for serving: per-module A/B tensors and scaling, checked against the base.

PEFT stays the reference for the format: its `LoraConfig` fields and its rank/alpha pattern
matching are used as they are, and every feature our batched layers cannot reproduce exactly is
refused here with the adapter name, the field and the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.utils.other import get_pattern_key

from loraserve.base.moe_experts import EXPERT_WEIGHTS
from loraserve.errors import AdapterIncompatible
from loraserve.lora.wrapping import UNSUPPORTED_MODULES
from loraserve.store.adapter_config import AdapterConfig
from loraserve.store.peft_names import lora_name, parse_lora_name, unwrapped


@dataclass
class ModuleLora:
    """A ([r, in]) and B ([out, r]) of one target module, and its scaling. For a fused routed-expert
    parameter, PEFT's A [E * r, in] and B [out, E * r] of its E experts."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    experts: int = 1

    @property
    def rank(self) -> int:
        return self.a.shape[0] // self.experts


@dataclass
class LoraWeights:
    """An adapter ready to copy into slots (host memory, engine dtype)."""

    name: str
    modules: dict[str, ModuleLora]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def parse_adapter(name: str, config: dict | AdapterConfig, tensors: dict[str, torch.Tensor],
                  base_shapes: dict[str, tuple[int, int]], max_rank: int,
                  dtype: torch.dtype, expert_shapes: dict[str, tuple[int, int, int]] | None = None) -> LoraWeights:
    """Check a PEFT LoRA adapter against the served base and decode it into `dtype`.

    `base_shapes` maps every module that has LoRA slots to its (in_features, out_features), and
    `expert_shapes` every fused routed-expert parameter with slots (`<experts>.gate_up_proj`) to
    (in_features, out_features, experts) of one expert.
    Every value that will reach a slot (A, and B times its scaling) must be finite in `dtype`:
    a slot's values are only ever multiplied with its own rows, but a NaN or an overflow would
    still ruin every answer of that adapter, so it is refused here, naming the tensor.
    """
    config = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config, name)
    if config.max_rank > max_rank:
        raise AdapterIncompatible(f"adapter {name!r}: LoRA rank {config.max_rank} is greater than max_lora_rank {max_rank}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        lora = parse_lora_name(key)
        if lora is None:
            raise AdapterIncompatible(_describe_unexpected_key(name, key))
        pairs.setdefault(lora.module, {})[lora.which] = tensor
    if not pairs:
        raise AdapterIncompatible(f"adapter {name!r} holds no LoRA weights")
    pairs = expert_parameter_names(name, pairs, config.raw.get("target_parameters") or [], expert_shapes or {})
    shapes = {**{m: (i, o, 1) for m, (i, o) in base_shapes.items()}, **(expert_shapes or {})}
    modules: dict[str, ModuleLora] = {}
    for module, pair in sorted(pairs.items()):
        _check_module(name, module, pair, shapes)
        a, b = pair["A"], pair["B"]
        r = int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r))
        alpha = float(config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha))
        in_features, out_features, experts = shapes[module]
        if a.shape != (experts * r, in_features) or b.shape != (out_features, experts * r):
            per = f" ({experts} experts x r={r})" if experts > 1 else f" for r={r}"
            raise AdapterIncompatible(
                f"adapter {name!r}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected ({experts * r}, {in_features}) and ({out_features}, {experts * r}){per} on this base")
        if r > max_rank:
            raise AdapterIncompatible(f"adapter {name!r}: LoRA rank {r} of {module} is greater than max_lora_rank {max_rank}")
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterIncompatible(f"adapter {name!r}: module {module} has non-float weights ({a.dtype})")
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        _check_finite(name, lora_name(module, "A"), a, dtype)
        _check_finite(name, lora_name(module, "B"), b, dtype)
        # What the slot will hold (layers.MultiLoraLinear.load_slot folds the scaling into B).
        _check_finite(name, lora_name(module, "B"), b * scaling, dtype, scaling)
        modules[module] = ModuleLora(a, b, scaling, experts)
    return LoraWeights(name=name, modules=modules, rank=max(m.rank for m in modules.values()))


def expert_parameter_names(name: str, pairs: dict[str, dict[str, torch.Tensor]], target_parameters: list[str],
                           expert_shapes: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, torch.Tensor]]:
    """`pairs` with PEFT's tensor names for routed-expert LoRA renamed to `<experts>.<parameter>`.

    PEFT wraps each targeted parameter of one module in its own ParamWrapper, nested in the
    module's parameter order (gate_up_proj, then down_proj), the first innermost, so the tensors
    of the i-th of k targeted parameters are saved under `<experts>` + `.base_layer` * (k - 1 - i):
    with both, gate_up_proj's under `experts.base_layer`, down_proj's under `experts` (as vLLM
    reads them). Which parameters are targeted is PEFT's own matching of `target_parameters`."""
    renamed: dict[str, dict[str, torch.Tensor]] = {}
    for module, pair in pairs.items():
        experts, depth = unwrapped(module)
        present = [p for p in EXPERT_WEIGHTS if f"{experts}.{p}" in expert_shapes]
        if not present:
            renamed[module] = pair
            continue
        targeted = [p for p in present if any(f"{experts}.{p}" == t or f"{experts}.{p}".endswith(f".{t}")
                                              for t in target_parameters)]
        if depth >= len(targeted):
            raise AdapterIncompatible(
                f"adapter {name!r} has LoRA tensors for {module}, but its target_parameters "
                f"({', '.join(target_parameters) or 'none'}) name {len(targeted)} parameters of {experts}")
        renamed[f"{experts}.{targeted[len(targeted) - 1 - depth]}"] = pair
    return renamed


def _check_finite(name: str, key: str, tensor: torch.Tensor, dtype: torch.dtype, scaling: float | None = None) -> None:
    if bool(torch.isfinite(tensor).all()):
        return
    if scaling is None:
        raise AdapterIncompatible(f"adapter {name!r}: tensor {key} has values that are not finite in {_dtype_name(dtype)} "
                                  "(NaN, inf, or beyond its range)")
    raise AdapterIncompatible(f"adapter {name!r}: tensor {key} times its scaling {scaling:g} (lora_alpha / r) is not "
                              f"finite in {_dtype_name(dtype)}; lower lora_alpha or the weights")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_module(name: str, module: str, pair: dict[str, torch.Tensor],
                  base_shapes: dict[str, tuple[int, int, int]]) -> None:
    parts = module.split(".")
    for part in parts:
        if part in UNSUPPORTED_MODULES and module not in base_shapes:
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
