"""The native engine's prefix cache: the KV of prompt prefixes, reused by later prompts that
start the same way on the same adapter version (a task adapter's fixed system prompt).

Keys are (adapter version, block-aligned token prefix): the KV of a prefix depends on the
adapter's weights, so nothing is shared across adapters, nor across versions of one adapter
(a version string is unique; a replaced or removed version's entries are dropped). Each stored
prompt is one entry (its KV up to its last whole block); every block boundary of it is indexed
by a chained digest of the tokens so far, so a prompt sharing only its first blocks still finds
it; a hit compares the tokens themselves, so a digest collision can never serve wrong KV.
Entries are evicted least recently used past `max_bytes`. Engine thread only (no lock).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer: keys and values [1, H, T, D] of one prompt prefix."""

BLOCK = 16
"""Prefix lengths are multiples of this many tokens."""


@dataclass
class _Entry:
    version: str
    tokens: tuple[int, ...]
    kv: KV
    digests: list[bytes]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in self.kv)


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    """Prompt tokens whose prefill a hit saved."""


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = BLOCK) -> None:
        self.max_bytes = max_bytes
        self.block = block
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[tuple[str, bytes], tuple[int, int]] = {}  # (version, digest) -> (entry id, blocks)
        self._next_id = 0
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _digests(self, tokens: list[int] | tuple[int, ...], blocks: int) -> list[bytes]:
        out, h = [], b""
        for i in range(blocks):
            chunk = tokens[i * self.block:(i + 1) * self.block]
            h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, version: str | None, tokens: list[int]) -> tuple[int, KV | None]:
        """(length, KV) of the longest cached prefix of `tokens` on `version` that leaves at
        least one token to prefill (its logits give the first output token); (0, None) on a miss."""
        if not self.enabled or len(tokens) <= self.block:
            return 0, None
        key = version or ""
        digests = self._digests(tokens, (len(tokens) - 1) // self.block)
        for blocks in range(len(digests), 0, -1):
            found = self._index.get((key, digests[blocks - 1]))
            if found is None:
                continue
            entry_id, _ = found
            entry = self._entries[entry_id]
            length = blocks * self.block
            if entry.tokens[:length] != tuple(tokens[:length]):
                continue  # a digest collision: never serve another prompt's KV
            self._entries.move_to_end(entry_id)
            self.stats.hits += 1
            self.stats.hit_tokens += length
            return length, [(k[:, :, :length], v[:, :, :length]) for k, v in entry.kv]
        self.stats.misses += 1
        return 0, None

    def store(self, version: str | None, tokens: list[int], kv: KV) -> None:
        """Keep the KV of `tokens`' whole blocks (`kv` covers at least those positions; it is
        copied, so the caller may go on using its own)."""
        blocks = len(tokens) // self.block
        if not self.enabled or blocks == 0:
            return
        key = version or ""
        length = blocks * self.block
        digests = self._digests(tokens, blocks)
        known = self._index.get((key, digests[-1]))
        if known is not None and known[1] == blocks:
            self._entries.move_to_end(known[0])  # this very prefix is stored already
            return
        entry = _Entry(key, tuple(tokens[:length]), [(k[:, :, :length].clone(), v[:, :, :length].clone())
                                                      for k, v in kv], digests)
        if entry.nbytes > self.max_bytes:
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = entry
        self.nbytes += entry.nbytes
        for i, digest in enumerate(digests):
            self._index[(key, digest)] = (entry_id, i + 1)
        while self.nbytes > self.max_bytes:
            self._evict(next(iter(self._entries)))

    def drop_version(self, version: str) -> None:
        """Forget every prefix of an adapter version (replaced or removed)."""
        for entry_id in [i for i, e in self._entries.items() if e.version == version]:
            self._evict(entry_id)

    def _evict(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.nbytes -= entry.nbytes
        for digest in entry.digests:
            if self._index.get((entry.version, digest), (None,))[0] == entry_id:
                del self._index[(entry.version, digest)]

    def __len__(self) -> int:
        return len(self._entries)
