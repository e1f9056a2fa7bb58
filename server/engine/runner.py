"""Runs the model: prefills (short prompts in one padded forward, a long one in chunks on its
own KV region), one batched decode step for the running batch.

The runner owns the KV cache (every sequence's region: `kv_cache.BatchKVCache`) and tells the
LoRA layers which slot each row uses before every forward; it knows nothing about requests,
sampling or adapters' names.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from loraserve.base.quantization import MLA_MODEL_TYPES
from loraserve.engine.kv_cache import KV, BatchKVCache, SequenceKV
from loraserve.engine.mla_absorbed import install_absorbed_mla
from loraserve.engine.row_attention import use_row_attention
from loraserve.lora.batch_context import LoraBatchContext


class ModelRunner:
    """Forward passes over the running batch; rows are in the order sequences joined."""

    def __init__(self, model: PreTrainedModel, context: LoraBatchContext, mla_absorb: bool = True,
                 kv_cache_bytes: int = 0) -> None:
        """`mla_absorb`: decode DeepSeek-V2/V3 attention over the cached latent (see mla_absorbed).
        `kv_cache_bytes`: the KV budget (0: see `kv_token_rows`)."""
        self.model = model
        if mla_absorb:
            install_absorbed_mla(model)
        use_row_attention(model)
        self.context = context
        self.device = model.get_input_embeddings().weight.device
        # Decode attention reads each row's tokens in place (one SDPA call per row) on CPU hosts;
        # MLA bases, whose latent is expanded after the cache returns it, and CUDA devices, where
        # one kernel launch per row and layer would cost more than the step (vLLM's paged kernels
        # are the GPU path), gather the rows into a padded batch each step instead.
        mla = getattr(model.config, "model_type", None) in MLA_MODEL_TYPES
        self.cache = BatchKVCache(model.config.num_hidden_layers, self.kv_token_rows(kv_cache_bytes),
                                  gather_decode=mla or self.device.type != "cpu")

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
        """The KV budget in tokens, all sequences together (see EngineConfig.kv_cache_bytes)."""
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

    def reserve(self, tokens: int) -> SequenceKV | None:
        """A KV region for a sequence that may hold `tokens` tokens; None while none is free."""
        return self.cache.reserve(tokens)

    def free(self, region: SequenceKV) -> None:
        """Give back the region of a sequence that ends before joining the batch."""
        self.cache.free(region)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], regions: list[SequenceKV]) -> torch.Tensor:
        """Run the prompts of joining sequences in one left-padded forward, their KV written to
        their `regions`, and add them as the last rows of the batch; returns the logits of each
        one's next token, [n, V] float32."""
        self.context.set(slots)
        longest = max(len(p) for p in prompts)
        pads = [longest - len(p) for p in prompts]
        pad_id = 0  # any valid id: pad positions are masked and never written to the cache
        input_ids = torch.tensor([[pad_id] * pad + p for pad, p in zip(pads, prompts)], device=self.device)  # [n, L]
        attention_mask = (torch.arange(longest, device=self.device)[None, :]
                          >= torch.tensor(pads, device=self.device)[:, None]).long()  # [n, L]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # real positions start at 0
        kwargs = {} if not any(pads) else {"attention_mask": attention_mask}
        self.cache.begin_prefill(regions, pads)
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1, **kwargs)
        self.cache.end_forward([len(p) for p in prompts])
        for region in regions:
            self.cache.join(region)
        return out.logits[:, -1].float()

    def prompt_kv(self, region: SequenceKV, tokens: int) -> KV:
        """Per layer, views of the keys and values of a region's first `tokens` tokens."""
        return self.cache.prompt_kv(region, tokens)

    @torch.inference_mode()
    def load_prefix(self, region: SequenceKV, kv: KV) -> None:
        """Start a sequence's region with a copy of a cached prefix."""
        self.cache.write_prefix(region, kv)

    @torch.inference_mode()
    def prefill_chunk(self, region: SequenceKV, tokens: list[int], slot: int) -> torch.Tensor:
        """Prefill `tokens`, the next of one prompt (positions region.length..), into its region;
        returns the logits after the chunk's last token, [1, V] float32. The batch is untouched
        until `join`."""
        self.context.set([slot])
        start = region.length
        positions = torch.arange(start, start + len(tokens), device=self.device)
        self.cache.begin_chunk(region)
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), position_ids=positions[None],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache.end_forward([len(tokens)])
        return out.logits[:, -1].float()

    def join(self, region: SequenceKV) -> None:
        """Add a prompt prefilled by `prefill_chunk` as the last row of the batch (nothing copied)."""
        self.cache.join(region)

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One step for every row: feeds each row's last token, returns logits [B, V] float32."""
        self.context.set(slots)
        attention_mask, position_ids = self.cache.decode_inputs(self.device)
        input_ids = torch.tensor(last_tokens, device=self.device)[:, None]  # [B, 1]
        self.cache.begin_decode()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True)
        self.cache.end_forward([1] * len(last_tokens))
        return out.logits[:, -1].float()

    def remove_rows(self, rows: set[int]) -> list[int]:
        """Drop the rows in `rows` (their KV regions are free for the next to join); returns the
        new row order: new row j is what was row order[j]."""
        return self.cache.remove_rows(rows)
