"""Runs the model: a prefill per joining sequence, one batched decode step for all others.

The runner owns the batch's KV cache and tells the LoRA layers which slot each row uses
before every forward; it knows nothing about requests, sampling or adapters' names.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from loraserve.engine.kv_cache import BatchKVCache
from loraserve.lora.layers import LoraBatchContext


class ModelRunner:
    """Forward passes over the running batch; rows are in the order sequences joined."""

    def __init__(self, model: PreTrainedModel, context: LoraBatchContext) -> None:
        self.model = model
        self.context = context
        self.device = model.get_input_embeddings().weight.device
        self.cache = BatchKVCache(model.config.num_hidden_layers)

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run the prompts of joining sequences in one left-padded forward and add them as the
        last rows of the batch; returns the logits of each one's next token, [n, V] float32."""
        self.context.set(slots)
        longest = max(len(p) for p in prompts)
        pads = [longest - len(p) for p in prompts]
        pad_id = 0  # any valid id: pad positions are masked and their cache entries zeroed
        input_ids = torch.tensor([[pad_id] * pad + p for pad, p in zip(pads, prompts)], device=self.device)  # [n, L]
        attention_mask = (torch.arange(longest, device=self.device)[None, :]
                          >= torch.tensor(pads, device=self.device)[:, None]).long()  # [n, L]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # real positions start at 0
        prefilled = DynamicCache(config=self.model.config)
        kwargs = {} if not any(pads) else {"attention_mask": attention_mask}
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=prefilled,
                         use_cache=True, logits_to_keep=1, **kwargs)
        self.cache.append(prefilled, pads)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One step for every row: feeds each row's last token, returns logits [B, V] float32."""
        self.context.set(slots)
        attention_mask, position_ids, cache_position = self.cache.decode_inputs(self.device)
        input_ids = torch.tensor(last_tokens, device=self.device)[:, None]  # [B, 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache_position=cache_position, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    def keep_rows(self, keep: list[int]) -> None:
        """Drop every row not in `keep`, freeing its KV memory now."""
        self.cache.keep_rows(keep)
