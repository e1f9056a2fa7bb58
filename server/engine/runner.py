"""Runs the model: prefills (short prompts in one padded forward, a long one in chunks on a KV
of its own), one batched decode step for the running batch.

The runner owns the batch's KV cache and tells the LoRA layers which slot each row uses
before every forward; it knows nothing about requests, sampling or adapters' names.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from loraserve.engine.kv_cache import BatchKVCache
from loraserve.engine.mla_absorbed import install_absorbed_mla
from loraserve.lora.layers import LoraBatchContext


class ModelRunner:
    """Forward passes over the running batch; rows are in the order sequences joined."""

    def __init__(self, model: PreTrainedModel, context: LoraBatchContext, mla_absorb: bool = True) -> None:
        """`mla_absorb`: decode DeepSeek-V2/V3 attention over the cached latent (see mla_absorbed)."""
        self.model = model
        if mla_absorb:
            install_absorbed_mla(model)
        self.context = context
        self.device = model.get_input_embeddings().weight.device
        self.cache = BatchKVCache(model.config.num_hidden_layers)
        self._last_prefill: tuple[DynamicCache, list[int], list[int]] | None = None  # cache, pads, lengths

    @torch.inference_mode()
    def kv_bytes_per_token(self) -> int:
        """Bytes one token of one sequence takes in the KV cache, every layer together: measured
        with a one-token forward (MLA bases store their latent and rotated key part, not
        expanded keys and values)."""
        self.context.set([0])
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    def kv_token_rows(self, configured_bytes: int) -> int:
        """The KV budget in tokens x sequences (see EngineConfig.kv_cache_bytes)."""
        budget = configured_bytes
        if not budget:
            if self.device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.6)
            else:
                import psutil

                budget = psutil.virtual_memory().available // 4
        return max(1, budget // self.kv_bytes_per_token())

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
        self._last_prefill = (prefilled, pads, [len(p) for p in prompts])
        return out.logits[:, -1].float()

    def prefilled_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values ([1, H, T, D], views) of prompt `row` of the last
        `prefill`, its padding cut off."""
        cache, pads, lengths = self._last_prefill
        start, end = pads[row], pads[row] + lengths[row]
        return [(layer.keys[row:row + 1, :, start:end], layer.values[row:row + 1, :, start:end])
                for layer in cache.layers]

    @staticmethod
    def kv_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.inference_mode()
    def cache_from(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        """A prompt's own KV that starts as a copy of `kv` (a cached prefix)."""
        cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k.clone(), v.clone(), i)
        return cache

    @torch.inference_mode()
    def prefill_chunk(self, cache: DynamicCache | None, tokens: list[int], start: int,
                      slot: int) -> tuple[DynamicCache, torch.Tensor]:
        """Prefill `tokens`, positions start.. of one prompt, on that prompt's own KV (`cache`,
        None for the first chunk); returns the KV and the logits after the chunk's last token,
        [1, V] float32. The batch is untouched until `join`."""
        self.context.set([slot])
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        positions = torch.arange(start, start + len(tokens), device=self.device)
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), position_ids=positions[None],
                         cache_position=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1].float()

    @torch.inference_mode()
    def join(self, cache: DynamicCache) -> None:
        """Add a prompt prefilled by `prefill_chunk` as the last row of the batch."""
        self.cache.append(cache, [0])

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One step for every row: feeds each row's last token, returns logits [B, V] float32."""
        self.context.set(slots)
        attention_mask, position_ids, cache_position = self.cache.decode_inputs(self.device)
        input_ids = torch.tensor(last_tokens, device=self.device)[:, None]  # [B, 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache_position=cache_position, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def remove_rows(self, rows: set[int]) -> list[int]:
        """Drop the rows in `rows` (their KV is free for the next to join); returns the new row
        order: new row j is what was row order[j]."""
        return self.cache.remove_rows(rows)
