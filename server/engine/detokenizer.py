"""Turns a stream of token ids into text deltas that never split a UTF-8 character and never
show text that a stop sequence will later cut off.

Byte-level tokenizers spread one Chinese character over several tokens; decoding a window that
ends inside a character yields U+FFFD, so such a tail is held until the text ends cleanly again
(invalid bytes the model produced stay U+FFFD and are released with the next clean text or at
the end; a hold never cuts a character that follows them).
Decoding works on a short window of recent tokens (prefix/read offsets, as vLLM and TGI do) so
each step costs the same however long the output is, and tokenizers that strip a leading space
at the start of a decode still produce the right delta.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Per-request state; `add` is called once per generated token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = ""  # text already handed to the client
        self._held = ""  # decoded text withheld because it may start a stop sequence
        self.stopped = False

    @property
    def text(self) -> str:
        return self._emitted

    def add(self, token_id: int) -> str:
        """Feed one token; returns the new text to show (possibly ""). Sets `stopped` when a
        stop sequence appeared: the output ends just before it."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        new_text = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(self._held + new_text)

    def flush(self) -> str:
        """At the end of generation: whatever was held back is final text now."""
        if self.stopped:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        tail = self._decode(self._ids[self._prefix_offset:])[len(prefix):]
        self._prefix_offset = self._read_offset = len(self._ids)
        held, self._held = self._held, ""
        # The stop check still applies: the last token may complete a stop sequence while
        # ending inside a character.
        out = self._release(held + tail, final=True)
        return out

    def _release(self, candidate: str, final: bool = False) -> str:
        if not self._stop:
            self._emitted += candidate
            return candidate
        # A stop sequence can start inside text already emitted only if it began in the held
        # part, which is why the held part is searched together with the new text.
        cut = min((i for i in (candidate.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            self._emitted += candidate[:cut]
            return candidate[:cut]
        keep = 0 if final else _longest_stop_prefix_suffix(candidate, self._stop)
        out, self._held = candidate[:len(candidate) - keep], candidate[len(candidate) - keep:]
        self._emitted += out
        return out

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
