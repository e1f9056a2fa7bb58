"""Where PEFT's behaviour on transformers 5 needs a guard to produce adapters we can serve.

PEFT 0.21 rewrites LoRA targets on MoE models whose experts transformers 5 fused: on
DeepSeek V2/V3 every target ending in gate_proj/up_proj/down_proj becomes a routed-expert
`target_parameters` entry, so dense MLPs and shared experts can no longer be targeted at all.
Inside `keep_module_targets()` that rewrite is off and targets mean exactly the modules named.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def keep_module_targets() -> Iterator[None]:
    """Within the block, PEFT applies `target_modules` to modules as written."""
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original
