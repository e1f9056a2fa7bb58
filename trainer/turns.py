"""One conversation -> (prompt ids, response ids), the prompt exactly what serving will send.

With a chat template, serving sends `apply_chat_template(context, add_generation_prompt=True)`
(context = every message but the last), and the model is trained to continue it with the answer
turn as the template writes it. Where the answer goes is found by position, not by comparing
strings: the conversation is rendered with a marker in place of the answer, and the answer's
text replaces the marker, so the turn keeps the template's own framing (role tag, separator,
EOS) around the answer exactly as given. A template that rewrites answers (DeepSeek-R1's drops
the reasoning of every assistant turn) so still trains on the whole answer.

The response is what follows the generation prompt in that turn:
- the turn starts with the generation prompt (deepseek-llm/V2 `Assistant:` before `Assistant: X`,
  V3 `<｜Assistant｜>`, R1 `<｜Assistant｜><think>\\n` before an answer that starts with `<think>\\n`):
  the rest of the turn;
- the generation prompt opens a block the answer closes (R1's `<think>\\n`, and an answer written
  as the model continues it: reasoning, `</think>`, the answer): the answer and the turn's end;
- otherwise the example is refused, saying what the template expects.

Without a chat template (a base model such as deepseek-llm-7b-base) a one-turn example trains as
raw text: the prompt encoded as serving encodes a raw prompt (with BOS), the answer after it.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import TemplateError

MARKER = "\u2063loraserve-answer\u2063"
"""Stands in for the answer while the template renders (between invisible separators, so no
template's filters or a real answer touch it)."""


class TurnError(Exception):
    """Why a conversation cannot be split; the data loader prefixes file and line."""


def split_turns(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """(prompt ids as serving sends them, the response text that follows them)."""
    if not getattr(tokenizer, "chat_template", None):
        return _raw(tokenizer, messages)
    context, answer = messages[:-1], messages[-1]["content"]
    try:
        prompt_ids = list(tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        prompt_text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        marked = tokenizer.apply_chat_template([*context, {"role": "assistant", "content": MARKER}], tokenize=False)
    except (TemplateError, ValueError) as e:  # the template's raise_exception: it refuses these messages
        raise TurnError(f"the chat template refused these messages: {e}") from None
    if marked.count(MARKER) != 1:
        raise TurnError("the chat template does not write the answer's text as given, so where the answer goes "
                        "cannot be found")
    before, after = marked.split(MARKER)
    turn = before + answer + after
    if turn.startswith(prompt_text):
        return prompt_ids, turn[len(prompt_text):]
    if not prompt_text.startswith(before):
        raise TurnError("the chat template writes the earlier turns differently once an answer follows them, "
                        "so the prompt serving sends is not where the answer starts")
    opened = prompt_text[len(before):]  # what the generation prompt adds past the turn's start
    tag = re.fullmatch(r"\s*<([\w-]+)>\s*", opened)
    if tag is not None and f"</{tag.group(1)}>" in answer:
        return prompt_ids, answer + after
    raise TurnError(f"the chat template's generation prompt ends with {opened!r}, which this answer does not "
                    f"continue: start the answer with {opened!r}"
                    + (f", or write it as its continuation (ending the block with '</{tag.group(1)}>')" if tag else ""))


def _raw(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"]:
        raise TurnError("this base has no chat template, so only one-turn examples (prompt/completion or "
                        "instruction, or one user and one assistant message) can train on it, as raw text")
    prompt_ids = list(tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"])
    return prompt_ids, messages[1]["content"]
