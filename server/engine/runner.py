"""Runs the model: a prefill per joining sequence, one batched decode step for all others.

The runner owns the batch's KV cache and tells the LoRA layers which slot each row uses
before every forward; it knows nothing about requests, sampling or adapters' names.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from server.engine.kv_cache import BatchKVCache
from server.lora.layers import LoraBatchContext


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
    def prefill(self, token_ids: list[int], slot: int) -> torch.Tensor:
        """Run one prompt alone (no padding, so its cache is exact) and add it as the last
        row of the batch; returns the logits of its next token, [V] float32."""
        self.context.set([slot])
        single = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([token_ids], device=self.device)  # [1, L]
        out = self.model(input_ids=input_ids, past_key_values=single, use_cache=True, logits_to_keep=1)
        self.cache.append(single)
        return out.logits[0, -1].float()

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
