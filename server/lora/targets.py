"""Target-module presets shared by the trainer, the tests and the demo, as PEFT regexes.

`mlp` means the dense MLPs and the MoE shared experts, never the routed experts (which
the trainer does not train; PEFT-made expert adapters are served). PEFT's own `all-linear` would also pick the routed experts and
the router on DeepSeek MoE models, so it is not used.
"""

from __future__ import annotations

_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
_MLP = r"(mlp|shared_experts)\.(gate_proj|up_proj|down_proj)"

PRESETS = {
    "attention": rf".*\.{_ATTENTION}",
    "mlp": rf".*\.{_MLP}",
    "all-linear": rf".*\.({_ATTENTION}|{_MLP})",
}


def target_regex(preset: str) -> str:
    """The PEFT `target_modules` regex for a preset name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]
