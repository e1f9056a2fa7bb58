"""The attention the native engine runs its model with: transformers' SDPA, except on a decode
step of the batch KV cache, where each row attends to its own tokens where they lie.

Semantics of a decode step, for row i with its tokens K_i, V_i [Hk, T_i, D] (this step's token
included) in its own region of the arena (`kv_cache.BatchKVCache`), query q_i [Hq, 1, D]:

    out_i = softmax(q_i K_i^T * scaling) V_i          (Hq / Hk query heads per key head)

one SDPA call per row on a view of its region: no row is padded to the longest one, nothing is
gathered or copied, and a row's numbers do not depend on its batch mates. Everything else
(prefill, a prompt chunk over its region's earlier tokens, MLA's expanded keys and values) gets
plain tensors and goes to transformers' own SDPA.

Registered with transformers' attention and mask interfaces under `NAME` (masks as for SDPA);
`use_row_attention` switches a model to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loraserve.engine.kv_cache import RowViews

NAME = "loraserve_rows"


def row_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    if not isinstance(key, RowViews):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.heads
    out = torch.cat([F.scaled_dot_product_attention(query[i:i + 1], key[i], value[i], scale=scaling, enable_gqa=gqa)
                     for i in range(len(key))])  # [B, Hq, 1, Dv]
    return out.transpose(1, 2), None  # [B, 1, Hq, Dv], as transformers' attention functions return it


AttentionInterface.register(NAME, row_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_row_attention(model: nn.Module) -> None:
    """Run `model`'s attention through `row_attention`."""
    model.set_attn_implementation(NAME)
