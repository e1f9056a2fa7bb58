"""The baseline the engine is measured against: PEFT serving the same adapters on its own copy of
the same quantized base, the way one would serve them without loraserve.

Two ways of serving with PEFT are measured: one request at a time (`set_adapter` + `generate`,
what PEFT supports for any model) and PEFT's mixed-adapter batch (`generate(adapter_names=...)`
on a left-padded batch). Both decode greedily and generate exactly `new_tokens` tokens. PEFT's
one-at-a-time tokens are also the reference the engine's greedy tokens are checked against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers.generation import GenerateDecoderOnlyOutput

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.lora.peft_compat import keep_module_targets

NEAR_TIE_GAP = 0.02
"""A differing greedy token where PEFT's top-2 logits are closer than this is a near-tie, not a
wrong model: bitsandbytes' CPU 4-bit matmul rounds activations to bfloat16, so an fp32 difference
of ~1e-6 in a LoRA term (the engine's bmm vs PEFT's two linears) moves logits by up to ~1e-2."""


class PeftBaseline:
    """One `PeftModel` holding every bench adapter, on a base loaded separately from the
    engine's (the engine wraps its base's linears in place, so they cannot share one)."""

    def __init__(self, model: PeftModel, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = model.get_input_embeddings().weight.device

    @classmethod
    def load(cls, base: BaseModelConfig, adapters: dict[str, Path]) -> PeftBaseline:
        """Load the base through `load_base` (same quantization as the engine) and every adapter."""
        loaded = load_base(base)
        names = list(adapters)
        # keep_module_targets: without it PEFT 0.21 would re-target our dense/shared-expert MLP
        # adapters onto the routed experts of DeepSeek V2/V3 and serve a different model.
        with keep_module_targets():
            model = PeftModel.from_pretrained(loaded.model, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
        model.eval()
        return cls(model, loaded.tokenizer.pad_token_id)

    @torch.inference_mode()
    def generate_sequential(self, prompts: list[list[int]], adapters: list[str],
                            new_tokens: int) -> list[list[int]]:
        """Serve the requests one after another, each on its adapter; new tokens per request."""
        outputs = []
        for prompt, adapter in zip(prompts, adapters):
            self.model.set_adapter(adapter)
            input_ids = torch.tensor([prompt], device=self.device)  # [1, L]
            out = self._generate(input_ids, torch.ones_like(input_ids), new_tokens)
            outputs.append(out[0, len(prompt):].tolist())
        return outputs

    @torch.inference_mode()
    def greedy_gaps(self, prompt: list[int], adapter: str, new_tokens: int) -> list[float]:
        """Top-1 minus top-2 logit at every step of one request's greedy path: how near a tie
        each choice was, so a differing token can be told apart from a wrong model."""
        self.model.set_adapter(adapter)
        input_ids = torch.tensor([prompt], device=self.device)  # [1, L]
        out = self._generate(input_ids, torch.ones_like(input_ids), new_tokens, output_logits=True,
                             return_dict_in_generate=True)
        top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values  # [N, 2]
        return (top2[:, 0] - top2[:, 1]).tolist()

    @torch.inference_mode()
    def generate_mixed(self, prompts: list[list[int]], adapters: list[str], new_tokens: int) -> list[list[int]]:
        """Serve all requests as one left-padded batch, each row on its own adapter."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=self.device)  # [B, L]
        attention_mask = torch.zeros_like(input_ids)  # [B, L]
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt, device=self.device)
            attention_mask[i, width - len(prompt):] = 1
        out = self._generate(input_ids, attention_mask, new_tokens, adapter_names=list(adapters))
        return out[:, width:].tolist()

    def explain_mismatches(self, prompts: list[list[int]], adapters: list[str], new_tokens: int,
                           reference: list[list[int]], rounds: list[list[list[int]]]) -> list[dict]:
        """Requests whose tokens in any of `rounds` differ from `reference` (this baseline's
        one-by-one greedy tokens), with the first differing position and PEFT's top-2 logit gap
        there: a near-tie is rounding noise, a clear winner means a wrong model."""
        found = []
        for i, position in first_differences(rounds, reference).items():
            gap = self.greedy_gaps(prompts[i], adapters[i], new_tokens)[position]
            found.append({"request": i, "adapter": adapters[i], "first_differing_token": position,
                          "peft_top2_logit_gap": gap, "near_tie": gap < NEAR_TIE_GAP})
        return found

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
                  **kwargs) -> torch.Tensor | GenerateDecoderOnlyOutput:
        # eos_token_id=None is the engine's ignore_eos: generation never stops early and EOS stays
        # a token greedy decoding may pick. (min_new_tokens would instead forbid EOS, so a request
        # whose greedy choice is EOS would continue differently from the engine's.)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=self.pad_token_id, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences  # [B, L + N]
        generated = sequences.shape[1] - input_ids.shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"PEFT generated {generated} tokens per request, expected {new_tokens}")
        return out


def first_differences(rounds: list[list[list[int]]], reference: list[list[int]]) -> dict[int, int]:
    """Request index -> first token position where its output in some round differs from `reference`."""
    found: dict[int, int] = {}
    for tokens in rounds:
        for i, (got, want) in enumerate(zip(tokens, reference)):
            if got != want and i not in found:
                found[i] = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return dict(sorted(found.items()))
