"""What the native engine prefills in one step, within its token budget (pure: no model here).

Whole prompts that fit go together into one padded forward (padded to the longest of them,
the padded total within the budget); then one chunk of the oldest longer prompt, into its own
KV region. A prompt over half the budget is chunked while others wait to be prefilled, so it never
takes a whole step from them; alone it may take the whole budget, but while sequences decode its
chunks are at most half of it: a chunk deep into a long prompt also attends to everything before
it, and on the small CPU bases a 64-token chunk at 2,000 tokens of context took ~35-55 ms, two
decode steps of 8 sequences, which every stream and every request arriving meanwhile waited for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BUDGET_CPU = 64
BUDGET_CUDA = 512
"""Prompt tokens per step when max_prefill_tokens is 0 (auto): about one decode step's time of
prefill (measured on 2 CPU cores: 64 tokens of the small bases ~ a decode step of 8 sequences),
so a step that carries a chunk lasts about two decode steps."""


def prefill_budget(configured: int, device: torch.device) -> int:
    return configured or (BUDGET_CUDA if device.type == "cuda" else BUDGET_CPU)


@dataclass(frozen=True)
class PrefillPlan:
    whole: list[int]
    """Indices of the prompts prefilled whole this step, in one padded forward, in queue order."""
    chunks: list[tuple[int, int]]
    """(index, tokens) of the prompts that continue on their own KV this step: first those whose
    rest is short (a cached prefix left little to do), then one chunk of the oldest longer one."""


def plan_prefill(prompts: list[tuple[int, int]], budget: int, decoding: bool = False) -> PrefillPlan:
    """`prompts`: (length, tokens already prefilled) of each admitted prompt, oldest first;
    `decoding`: whether sequences are decoding (a long prompt's chunk is then at most half the budget)."""
    crowded = len(prompts) > 1
    whole: list[int] = []
    longest = 0
    for i, (length, done) in enumerate(prompts):
        if done or length > budget or (crowded and length > budget // 2):
            continue
        if max(longest, length) * (len(whole) + 1) > budget:
            continue  # a shorter one further back may still fit
        whole.append(i)
        longest = max(longest, length)
    room = budget - longest * len(whole)
    chunks: list[tuple[int, int]] = []
    rest = [i for i in range(len(prompts)) if i not in whole]
    for i in rest:  # short remainders first: they finish this step
        left = prompts[i][0] - prompts[i][1]
        if prompts[i][1] and left <= budget // 2 and left <= room:
            chunks.append((i, left))
            room -= left
    oldest = next((i for i in rest if all(i != c for c, _ in chunks)), None)
    if oldest is not None:  # a long prompt always moves on
        room = min(room, budget // 2) if decoding else room
        chunks.append((oldest, min(prompts[oldest][0] - prompts[oldest][1], max(room, budget // 4))))
    return PrefillPlan(whole, chunks)
