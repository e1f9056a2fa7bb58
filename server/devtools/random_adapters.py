"""Random-initialised PEFT adapters for a local base: for tests, the demo and benchmarks.

They are made with PEFT itself (`init_lora_weights=False` makes A and B random, so a missing
LoRA term changes the output) and saved in PEFT's own layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraserve.lora.peft_compat import keep_module_targets
from loraserve.lora.targets import target_regex


def make_random_adapter(base_dir: str | Path, out_dir: str | Path, r: int = 8, lora_alpha: int = 16,
                        target: str = "attention", seed: int = 0, use_rslora: bool = False,
                        model: torch.nn.Module | None = None, target_parameters: list[str] | None = None) -> Path:
    """Write a PEFT adapter with random A/B for the base in `base_dir`. `target` is a preset
    (attention, mlp, all-linear) or a PEFT regex; `target_parameters` adds PEFT parameter targets
    (e.g. the routed experts' `mlp.experts.gate_up_proj`). Pass `model` (an fp32 copy of the
    base) to skip reloading it when making many adapters."""
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    regex = target_regex(target) if target in ("attention", "mlp", "all-linear") else target
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=regex, init_lora_weights=False,
                        use_rslora=use_rslora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_parameters=target_parameters)
    with keep_module_targets(), torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        # PEFT's random init is scaled for training; scale it up so every adapter clearly
        # changes greedy outputs of a random base (a weak LoRA term could hide a bug).
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
        peft_model.save_pretrained(out_dir)
        peft_model.unload()  # give the caller its base back without LoRA layers
    return Path(out_dir)
