"""A validated view of a PEFT `adapter_config.json`: the fields loraserve reads, each checked
for its type and range, and every LoRA variant we do not serve refused by name.

The file comes from a client, so it is parsed as plain JSON data (never through PEFT's
`from_pretrained`, which can load code), bounded in size by the store and in depth here, and
each problem is a FAILED_PRECONDITION naming the field and the value. Torch-free: the store
checks configs while staging, before the engine sees them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from loraserve.errors import AdapterIncompatible

CONFIG_FILE = "adapter_config.json"
MAX_DEPTH = 32
"""Deepest JSON nesting accepted. A real config is 3 levels deep (rank_pattern's values); the
bound keeps a hostile file from spending the parser's recursion."""
CODE_KEYS = ("auto_map", "custom_code", "trust_remote_code")
"""Config keys that would make a loader import or run code (transformers' auto_map and friends)."""
REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (extra full-weight modules)",
    "trainable_token_indices": "trainable_token_indices (embedding rows)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layout)",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
"""Config fields that switch on a LoRA variant we do not serve, with how we describe them."""
MODULE_WEIGHT = ".weight"
"""A `target_parameters` entry ending so names one Linear's own weight: PEFT's way of writing an
ordinary module LoRA (the same lora_A/lora_B tensors) that its transformers-5 loader will not
re-aim at the routed experts."""
ROUTED_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
"""The fused routed-expert weights of DeepSeek-V2/V3 (`gate_up_proj`, `mlp.experts.down_proj`):
PEFT 0.21 writes MLP targets there; the engine decides whether it serves them."""


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that decide how an adapter is served."""

    r: int
    """Default rank of every module."""
    lora_alpha: float
    """Default alpha; scaling = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    rank_pattern: dict[str, int]
    """Module pattern -> rank, overriding `r` (PEFT's matching rules)."""
    alpha_pattern: dict[str, float]
    """Module pattern -> alpha, overriding `lora_alpha`."""
    use_rslora: bool
    raw: dict
    """The whole object, as parsed (for fields only some callers read)."""

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> AdapterConfig:
        """Parse and validate the file's bytes; AdapterIncompatible naming what is wrong."""
        label = f"adapter {name!r}: {CONFIG_FILE}"
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise AdapterIncompatible(f"{label} is not valid JSON (not UTF-8)") from None
        except json.JSONDecodeError as exc:
            raise AdapterIncompatible(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise AdapterIncompatible(f"{label} is nested more than {MAX_DEPTH} levels deep") from None
        return cls.from_dict(raw, name)

    @classmethod
    def from_dict(cls, raw: object, name: str) -> AdapterConfig:
        """Validate an already parsed config object."""
        label = f"adapter {name!r}: {CONFIG_FILE}"
        if not isinstance(raw, dict):
            raise AdapterIncompatible(f"{label} must hold a JSON object, not {_kind(raw)}")
        if _depth(raw) > MAX_DEPTH:
            raise AdapterIncompatible(f"{label} is nested more than {MAX_DEPTH} levels deep")
        for key in CODE_KEYS:
            if key in raw:
                raise AdapterIncompatible(f"{label} has {key!r}, which would load code")
        peft_type = raw.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise AdapterIncompatible(f"adapter {name!r}: peft_type is {_show(peft_type)}, only LORA is served")
        for field, what in REFUSED_FLAGS.items():
            if raw.get(field):
                raise AdapterIncompatible(f"adapter {name!r}: {what} is not supported ({field}={_show(raw[field])})")
        _check_target_parameters(raw.get("target_parameters"), name, label)
        bias = raw.get("bias", "none")
        if bias != "none":
            raise AdapterIncompatible(f"adapter {name!r}: bias={_show(bias)} is not supported, only bias='none'")
        r = _positive_int(raw.get("r"), "r", label)
        alpha = _positive_number(raw.get("lora_alpha"), "lora_alpha", label)
        use_rslora = raw.get("use_rslora", False)
        if use_rslora is None:
            use_rslora = False
        if not isinstance(use_rslora, bool):
            raise AdapterIncompatible(f"{label}: use_rslora must be true or false, got {_show(use_rslora)}")
        rank_pattern = {k: _positive_int(v, f"rank_pattern[{k!r}]", label)
                        for k, v in _pattern(raw, "rank_pattern", label).items()}
        alpha_pattern = {k: _positive_number(v, f"alpha_pattern[{k!r}]", label)
                         for k, v in _pattern(raw, "alpha_pattern", label).items()}
        return cls(r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   use_rslora=use_rslora, raw=raw)


def _check_target_parameters(value: object, name: str, label: str) -> None:
    """Accept module weights and routed-expert parameters; the tensors still decide what is served."""
    if not value:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterIncompatible(f"{label}: target_parameters must be a list of parameter names, "
                                  f"got {_show(value)}")
    other = [v for v in value if not v.endswith(MODULE_WEIGHT) and v.rpartition(".")[2] not in ROUTED_EXPERT_PARAMETERS]
    if other:
        raise AdapterIncompatible(f"adapter {name!r}: target_parameters {_show(other)} names no parameter LoRA is served "
                                  "on (a module's weight, `<module>.weight`, or the routed experts' "
                                  f"{' / '.join(ROUTED_EXPERT_PARAMETERS)})")


def _pattern(raw: dict, field: str, label: str) -> dict:
    value = raw.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterIncompatible(f"{label}: {field} must map module patterns to numbers, not {_kind(value)}")
    return value


def _positive_int(value: object, field: str, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterIncompatible(f"{label}: {field} must be a positive integer, got {_show(value)}")
    return value


def _positive_number(value: object, field: str, label: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise AdapterIncompatible(f"{label}: {field} must be a positive finite number, got {_show(value)}")
    return float(value)


def _depth(value: object, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed JSON, counted only up to `limit` + 1 (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _show(value: object) -> str:
    """A value for a message: short, and never a Python type name."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
