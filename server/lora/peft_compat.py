"""Where PEFT's behaviour on transformers 5 needs a guard to produce adapters we can serve.

PEFT 0.21 rewrites LoRA targets on MoE models whose experts transformers 5 fused
(`convert_peft_config_for_transformers`, run by every `get_peft_model` and every
`PeftModel.from_pretrained`): on DeepSeek V2/V3 every target ending in gate_proj/up_proj/
down_proj, whether listed by name or matched by a regex (a regex is first reduced to the leaf
names it matches), becomes a routed-expert `target_parameters` entry, so dense MLPs and shared
experts can no longer be targeted as modules at all. No config field turns the rewrite off.

- Training: inside `keep_module_targets()` the rewrite is off and targets mean exactly the
  modules named, so those MLPs train as ordinary LoRA modules, with dropout.
- Saving: `loadable_targets()` names the same modules in the one form the rewrite leaves
  alone, so plain PEFT loads the adapter exactly as trained with no patch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def keep_module_targets() -> Iterator[None]:
    """Within the block, PEFT applies `target_modules` to modules as written."""
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers

    def keep(*args, **kwargs) -> None:
        return None

    keep.__wrapped__ = original  # loadable_targets() asks the real rewrite, even inside the block
    conversion.convert_peft_config_for_transformers = keep
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def loadable_targets(model, modules: Iterable[str]) -> dict:
    """adapter_config.json fields that make plain PEFT put LoRA on exactly `modules` (full
    paths inside `model`, the transformers model without PEFT's wrapper) and nothing else.

    A module PEFT's load-time rewrite leaves alone is listed in `target_modules`. One it would
    rewrite is named by its weight in `target_parameters` instead (`<module>.weight`): PEFT then
    wraps that Linear's weight in a `ParamWrapper`, which saves and loads the very same
    lora_A [r, in] / lora_B [out, r] tensors and computes the same W + scaling * B @ A. That
    wrapper refuses any lora_dropout, so the config then says 0: dropout only acts in training,
    and the rate trained with stays in the trainer's manifest.
    """
    import peft.utils.transformers_weight_conversion as conversion
    from peft import LoraConfig

    rewrite = conversion.convert_peft_config_for_transformers
    rewrite = getattr(rewrite, "__wrapped__", rewrite)
    kept, by_weight = [], []
    for module in sorted(set(modules)):
        # Each module alone: PEFT itself says whether its loader keeps the name. Alone, a fused
        # half (gate_proj without up_proj) makes the rewrite raise, which means rewritten too.
        probe = LoraConfig(target_modules=[module])
        try:
            rewrite(probe, model=model, conversions=None)
            rewritten = not probe.target_modules or module not in probe.target_modules
        except ValueError:
            rewritten = True
        (by_weight if rewritten else kept).append(module)
    fields: dict = {"target_modules": kept, "target_parameters": [f"{m}.weight" for m in by_weight] or None}
    if by_weight:
        fields["lora_dropout"] = 0.0
    return fields
