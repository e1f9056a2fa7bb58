"""Bounds on a request's input that hold before it is tokenized.

Tokenizing is the one step whose cost grows with whatever a client sends, so a prompt that
cannot fit is refused from its size alone: a token decodes to at most `max_token_bytes` bytes
(the longest entry of the vocabulary), so a prompt of more than max_input_tokens x that many
bytes has more than max_input_tokens tokens, and is never tokenized. The bound never refuses a
prompt that fits (DeepSeek's tokenizers have no normalizer that could shrink text first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraserve.errors import InvalidArgument


@dataclass(frozen=True)
class InputLimits:
    max_input_tokens: int
    max_token_bytes: int
    """Bytes of the longest token of the tokenizer (DeepSeek's: 128, a run of spaces)."""

    @property
    def max_input_bytes(self) -> int:
        """Longest prompt, in UTF-8 bytes, that can still be max_input_tokens tokens."""
        return self.max_input_tokens * self.max_token_bytes

    @property
    def max_messages(self) -> int:
        """Most chat messages: every template marks each message with at least one token."""
        return self.max_input_tokens

    def check_prompt(self, prompt: str) -> None:
        """InvalidArgument when `prompt` is too large to fit, decided without tokenizing it."""
        if len(prompt) > self.max_input_bytes or (len(prompt) * 4 > self.max_input_bytes
                                                  and len(prompt.encode("utf-8")) > self.max_input_bytes):
            raise InvalidArgument(
                f"the prompt is {len(prompt.encode('utf-8')):,} bytes; at most {self.max_input_bytes:,} can fit "
                f"max_input_tokens {self.max_input_tokens} (a token of this model is at most "
                f"{self.max_token_bytes} bytes)")

    def check_messages(self, messages: Sequence) -> None:
        """The same for chat messages (each with `role` and `content` attributes), their number
        included; cost grows with the number of messages only up to the bound."""
        if len(messages) > self.max_messages:
            raise InvalidArgument(f"{len(messages):,} messages are more than max_input_tokens "
                                  f"{self.max_input_tokens} tokens can hold")
        total = 0
        for m in messages:
            total += len(m.role.encode("utf-8")) + len(m.content.encode("utf-8"))
            if total > self.max_input_bytes:
                raise InvalidArgument(
                    f"the messages are over {self.max_input_bytes:,} bytes, more than max_input_tokens "
                    f"{self.max_input_tokens} can hold (a token of this model is at most {self.max_token_bytes} bytes)")


def max_token_bytes(tokenizer) -> int:
    """Bytes of the longest token `tokenizer` can produce: exact for byte-level BPE (DeepSeek's;
    each vocabulary character stands for one byte), an upper bound otherwise (the UTF-8 length
    of the vocabulary string, which is never shorter than what it decodes to)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and "ByteLevel" in str(backend.decoder)
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    special |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    longest = 1
    for token in tokenizer.get_vocab():
        size = len(token) if byte_level and token not in special else len(token.encode("utf-8"))
        longest = max(longest, size)
    return longest
