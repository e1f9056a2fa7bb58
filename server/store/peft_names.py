"""The names PEFT gives a LoRA adapter's tensors, parsed in one place.

PEFT saves a LoRA on module `M` (a path inside the model, e.g. `model.layers.0.self_attn.q_proj`)
as `base_model.model.M.lora_A.weight` ([r, in]) and `base_model.model.M.lora_B.weight`
([out, r]). Admission reads these names from a safetensors header, the engine from the decoded
tensors and the trainer from what it saved; all three parse them here. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "base_model.model."
_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class LoraTensorName:
    module: str
    """The module's path inside the model (PEFT's prefix removed)."""
    which: str
    """'A' ([r, in]) or 'B' ([out, r])."""


def parse_lora_name(key: str) -> LoraTensorName | None:
    """The module and factor a LoRA tensor name stands for; None for any other name."""
    match = _NAME.fullmatch(key)
    return None if match is None else LoraTensorName(match["module"], match["which"])


def lora_name(module: str, which: str) -> str:
    """The tensor name PEFT saves factor `which` ('A' or 'B') of `module` under."""
    return f"{PREFIX}{module}.lora_{which}.weight"


def lora_modules(keys: Iterable[str]) -> list[str]:
    """The modules the LoRA tensors among `keys` target, sorted (other names are ignored)."""
    return sorted({name.module for name in map(parse_lora_name, keys) if name is not None})


WRAPPER = ".base_layer"
"""What PEFT inserts in a module path for each wrapper nested inside another (ParamWrappers of
several parameters of one module: `<experts>.base_layer` holds the first)."""


def unwrapped(module: str) -> tuple[str, int]:
    """`module` without PEFT's trailing `.base_layer`s, and how many there were."""
    depth = 0
    while module.endswith(WRAPPER):
        module, depth = module.removesuffix(WRAPPER), depth + 1
    return module, depth
