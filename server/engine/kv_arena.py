"""Where each sequence's KV lives: a contiguous range of the KV budget's token positions, taken
when the sequence is admitted and given back when it ends (pure bookkeeping, no tensors).

A sequence reserves everything it may ever need (its prompt and every token it may generate),
so it never grows, never moves and never runs out of room mid-decode; what it does not use is
given back when it ends. Ranges are taken first fit from a free list kept sorted and coalesced.
Fragmentation can make a request wait although the free total would hold it; it then runs once
neighbours end (`largest_free` is what admission checks).
"""

from __future__ import annotations

import bisect


class TokenArena:
    """First-fit ranges of [0, capacity) token positions."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a KV arena needs at least one token, got {capacity}")
        self.capacity = capacity
        self._starts: list[int] = [0]  # free ranges, sorted by start, never adjacent
        self._lengths: list[int] = [capacity]
        self.used = 0

    def allocate(self, tokens: int) -> int | None:
        """The start of a free range of `tokens` positions, now taken; None when none is that long."""
        if tokens < 1:
            raise ValueError(f"a KV range needs at least one token, got {tokens}")
        for i, length in enumerate(self._lengths):
            if length >= tokens:
                start = self._starts[i]
                if length == tokens:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += tokens
                    self._lengths[i] -= tokens
                self.used += tokens
                return start
        return None

    def free(self, start: int, tokens: int) -> None:
        """Give back the range [start, start + tokens) taken by `allocate`."""
        i = bisect.bisect_left(self._starts, start)
        if (i < len(self._starts) and self._starts[i] < start + tokens) or \
                (i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start):
            raise ValueError(f"KV range {start}+{tokens} overlaps a free range: freed twice?")
        merge_left = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start
        merge_right = i < len(self._starts) and self._starts[i] == start + tokens
        if merge_left and merge_right:
            self._lengths[i - 1] += tokens + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif merge_left:
            self._lengths[i - 1] += tokens
        elif merge_right:
            self._starts[i] = start
            self._lengths[i] += tokens
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, tokens)
        self.used -= tokens

    def largest_free(self) -> int:
        """The longest range `allocate` could return now."""
        return max(self._lengths, default=0)

    def free_ranges(self) -> list[tuple[int, int]]:
        """(start, length) of every free range, in order."""
        return list(zip(self._starts, self._lengths))
