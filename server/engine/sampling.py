"""Next-token choice for a whole batch at once, each row with its own settings and generator.

Every row draws exactly one uniform number per step from its own `torch.Generator`, and its
choice depends only on its own logits, so a seeded request gives the same tokens alone or in
any batch. The filters follow transformers' definitions (repetition penalty divides positive
and multiplies negative logits of seen tokens; top-k, then top-p on the sorted distribution).
"""

from __future__ import annotations

import torch

from loraserve.engine.request import SamplingParams


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 seen: list[torch.Tensor] | None) -> list[int]:
    """One token per row of `logits` ([B, V], float32). `seen[i]` is a [V] bool mask of the
    tokens in row i's prompt and output, needed only when some row has a repetition penalty."""
    logits = logits.float()
    batch = logits.shape[0]
    penalties = torch.tensor([p.repetition_penalty for p in params], device=logits.device)
    if seen is not None and bool((penalties != 1.0).any()):
        mask = torch.stack(seen)  # [B, V]
        pen = penalties[:, None]
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(mask, penalized, logits)
    choice = logits.argmax(dim=-1)  # [B] greedy for every row; sampled rows overwrite below
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        picked = _sample_rows(logits.index_select(0, rows), [params[i] for i in sampled],
                              [generators[i] for i in sampled])
        choice = choice.index_copy(0, rows, picked)
    return choice.tolist() if batch else []


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """Temperature, top-k and top-p, then inverse-CDF draws: [b, V] -> [b]."""
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)  # [b, V], for the filters
    positions = torch.arange(vocab, device=device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(positions >= top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    probs = probs.masked_fill(before >= top_p, 0.0)  # the first token always survives
    # Draw in vocabulary order, not probability order: two nearly tied tokens swap places in
    # the sorted order under float noise (a row alone vs in a batch), and the same uniform
    # number would then pick the other one. In id order such noise moves the CDF by ~1e-6.
    probs = torch.zeros_like(probs).scatter_(1, order, probs)  # [b, V] in id order
    cdf = probs.cumsum(dim=-1)  # [b, V]
    # One draw per row from that row's own generator (generators live on the CPU).
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)[:, None]
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=vocab - 1)  # [b, 1]
    # A uniform draw can land on a zero-probability id only through rounding at a boundary:
    # step back to the nearest kept token.
    index = torch.where(probs.gather(1, index) > 0, index, (cdf < cdf.gather(1, index)).sum(-1, keepdim=True) - 1)
    return index.clamp_(min=0).squeeze(1)
