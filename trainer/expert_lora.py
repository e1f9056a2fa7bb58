"""QLoRA on 4-bit routed MoE experts: a PEFT custom LoRA layer for DeepSeek-V2/V3's experts.

PEFT puts LoRA on fused experts with `target_parameters` (ParamWrapper), which parametrizes the
fused weight Parameter: it cannot wrap loraserve's 4-bit per-expert buffers (moe_experts.py). So
with a 4-bit base the trainer registers this layer for the experts module through PEFT's custom
module API: PEFT still owns training, trainability, checkpoints and resume, and the layer runs
the 4-bit experts (`moe_experts.fourbit_experts_forward`) with each expert's LoRA term added
(semantics as lora.expert_layers, one adapter):

    g = x @ W_gate_up[e].T + scaling * (dropout(x) @ A_gu[e].T) @ B_gu[e].T
    y = act(g) @ W_down[e].T + scaling * (dropout(h) @ A_d[e].T) @ B_d[e].T

with A / B in PEFT ParamWrapper's layout (lora_A [E * r, in] and lora_B [out, E * r] per
parameter). The saved adapter is then rewritten by trainer/output.py into ParamWrapper's own
tensor names (`experts.base_layer.*` for gate_up_proj, `experts.*` for down_proj), so plain
PEFT loads it on the full-precision base and the server serves it like any PEFT expert LoRA.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from loraserve.base.moe_experts import fourbit_experts_forward

EXPERTS_MODULE = r".*\.mlp\.experts"
"""PEFT target_modules regex (fullmatch) of the routed-experts modules (not shared_experts)."""
DOWN_A, DOWN_B = "lora_down_A", "lora_down_B"
"""down_proj's factors; gate_up_proj's are PEFT's own `lora_A` / `lora_B`."""


class FourBitExpertsLora(nn.Module, LoraLayer):
    """LoRA on both fused parameters of one 4-bit experts module (see the module docstring)."""

    adapter_layer_names = ("lora_A", "lora_B", DOWN_A, DOWN_B)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        super().__init__()
        if not hasattr(base_layer, "weight"):
            # PEFT's _replace_module reads the target's `weight` (else its first parameter) only
            # for its device; 4-bit experts hold buffers alone. Not registered: saved nowhere.
            object.__setattr__(base_layer, "weight", base_layer.gate_up_proj_packed)
        LoraLayer.__init__(self, base_layer)
        self.lora_down_A = nn.ModuleDict({})
        self.lora_down_B = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        meta = module._fourbit_meta
        out_gu, in_gu = meta["shapes"]["gate_up_proj"]
        return in_gu, out_gu

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        meta = self.get_base_layer()._fourbit_meta
        experts = meta["num_experts"]
        (out_gu, in_gu), (out_d, in_d) = meta["shapes"]["gate_up_proj"], meta["shapes"]["down_proj"]
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.lora_bias[adapter_name] = False
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(in_gu, r * experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * experts, out_gu, bias=False)
        self.lora_down_A[adapter_name] = nn.Linear(in_d, r * experts, bias=False)
        self.lora_down_B[adapter_name] = nn.Linear(r * experts, out_d, bias=False)
        for a, b in ((self.lora_A, self.lora_B), (self.lora_down_A, self.lora_down_B)):
            if config.init_lora_weights is not False:  # PEFT's default: A as nn.Linear, B zero
                nn.init.kaiming_uniform_(a[adapter_name].weight, a=math.sqrt(5))
                nn.init.zeros_(b[adapter_name].weight)
        device = next(iter(self.get_base_layer().buffers())).device
        for layer in (self.lora_A, self.lora_B, self.lora_down_A, self.lora_down_B):
            layer[adapter_name].to(device)
        self.set_adapter(self.active_adapters)

    def _term(self, adapter: str, a: nn.ModuleDict, b: nn.ModuleDict, expert: int, x: torch.Tensor) -> torch.Tensor:
        """scaling * (dropout(x) @ A_e.T) @ B_e.T for one expert: x [n, in] -> [n, out]."""
        experts = self.get_base_layer()._fourbit_meta["num_experts"]
        weight_a, weight_b = a[adapter].weight, b[adapter].weight
        a_e = weight_a.view(experts, -1, weight_a.shape[-1])[expert]  # [r, in]
        b_e = weight_b.view(weight_b.shape[0], -1, experts)[:, :, expert]  # [out, r]
        x = self.lora_dropout[adapter](x.to(a_e.dtype))
        return (x @ a_e.t()) @ b_e.t() * self.scaling[adapter]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]"""
        base = self.get_base_layer()
        if self.disable_adapters:
            return base(hidden_states, top_k_index, top_k_weights)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        factors = {"gate_up_proj": (self.lora_A, self.lora_B), "down_proj": (self.lora_down_A, self.lora_down_B)}

        def terms(name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
            a, b = factors[name]
            return sum(self._term(adapter, a, b, expert, x) for adapter in adapters)

        return fourbit_experts_forward(base, hidden_states, top_k_index, top_k_weights, extra=terms if adapters else None)
