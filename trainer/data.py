"""Training data: JSON-lines files -> tokenized (prompt, response) pairs -> padded batches.

Each line of a `.jsonl` file is one example in one of three forms (blank lines are ignored):

    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                        the last message is the assistant's answer; earlier turns are context
    instruction         {"instruction": str, "input": str (optional), "output": str}
                        -> user: instruction + ("\\n\\n" + input if input), assistant: output
    prompt/completion   {"prompt": str, "completion": str}  -> user: prompt, assistant: completion

Keys outside these forms (an "id", say) are ignored. Every form becomes a list of chat messages,
and the prompt is built from them by the base tokenizer's own chat template, the one the server
applies, so an adapter is trained on exactly the token sequence it will be served:

    prompt_ids   = apply_chat_template(messages[:-1], add_generation_prompt=True)   # what serving sends
    response_ids = tokenize(the answer's turn past that prompt)  (no special tokens added; EOS kept)

where the answer's turn is found by position in the template's rendering (see
`loraserve.trainer.turns`, which also covers R1's `<think>` generation prompt and bases without
a chat template). With DeepSeek's templates the response text is `" {answer}<eos>"`
(deepseek-llm/v2, after `Assistant:`) or `"{answer}<eos>"` (v3, after the `<｜Assistant｜>`
special token). The response is tokenized on its own, so the tokenizer never merges across the
prompt/response boundary; the prompt ids are exactly what serving will feed the model. Loss is
taken only on the response (see `collate`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.errors import InvalidArgument
from loraserve.trainer.turns import TurnError, split_turns

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # labels value that torch's cross_entropy (and HF models) skip

# Which keys make which form. A line whose keys touch two forms is refused rather than guessed.
_FORM_KEYS: dict[str, frozenset[str]] = {
    "chat": frozenset({"messages"}),
    "instruction": frozenset({"instruction", "input", "output"}),
    "prompt/completion": frozenset({"prompt", "completion"}),
}


class DataError(InvalidArgument):
    """A training file is unusable; the message names the file and line: `train.jsonl:17: ...`."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    prompt_ids: list[int]  # the chat template's rendering of every message but the last, with generation prompt
    response_ids: list[int]  # the answer's tokens, ending with EOS unless truncation cut it
    source: str  # "file.jsonl:LINE" (file name only, never a directory)


@dataclass
class DatasetReport:
    """What was read, for the run's manifest and logs."""

    files: list[str] = field(default_factory=list)  # as passed in (or found in the directory), in load order
    sha256: dict[str, str] = field(default_factory=dict)  # file -> hex digest of its bytes
    examples: int = 0
    skipped_lines: int = 0  # bad lines passed over with skip_bad_lines=True
    truncated: int = 0  # examples cut to max_seq_length


class _BadLine(Exception):
    """A reason this line is unusable; becomes DataError (or a skip) with the file:line prefix."""


def load_examples(path: str | Path, tokenizer: Any, max_seq_length: int,
                  skip_bad_lines: bool = False) -> tuple[list[Example], DatasetReport]:
    """Read and tokenize `path` (a .jsonl file, or a directory: every *.jsonl in it, by name).

    Raises DataError naming file and line for the first bad line, unless `skip_bad_lines`, in
    which case bad lines are counted in `report.skipped_lines`. Examples longer than
    `max_seq_length` are truncated (see `_truncate`) and counted. No examples at all is an error.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 (one prompt and one response token), got {max_seq_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
    files = _data_files(Path(path))
    report = DatasetReport(files=[str(f) for f in files])
    examples: list[Example] = []
    for file in files:
        raw = file.read_bytes()
        report.sha256[str(file)] = hashlib.sha256(raw).hexdigest()
        if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM some editors write
            raw = raw[3:]
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            source = f"{file.name}:{number}"
            try:
                messages = _parse_line(line)
                prompt_ids, response_ids = _tokenize(tokenizer, messages)
            except _BadLine as reason:
                if not skip_bad_lines:
                    raise DataError(f"{source}: {reason}") from None
                report.skipped_lines += 1
                continue
            if len(prompt_ids) + len(response_ids) > max_seq_length:
                prompt_ids, response_ids = _truncate(prompt_ids, response_ids, max_seq_length)
                report.truncated += 1
            examples.append(Example(prompt_ids, response_ids, source))
    if not examples:
        skipped = f" ({report.skipped_lines} bad lines skipped)" if report.skipped_lines else ""
        raise DataError(f"{Path(path).name}: no training examples{skipped}")
    report.examples = len(examples)
    return examples, report


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, eval) split: the same examples, fraction and seed always give the
    same split. round(n * eval_fraction) examples go to eval, at least one when the fraction is
    above zero and at least one stays in train. Both halves keep the input order (the training
    loop does its own shuffling)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), n - 1)
    if n_eval <= 0:
        return list(examples), []
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    evals = [e for i, e in enumerate(examples) if i in chosen]
    return train, evals


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. `labels` equal `input_ids` on response tokens and IGNORE_INDEX (-100)
    on prompt and padding, so loss falls only on the response. Labels are NOT shifted: Hugging
    Face causal LMs shift them internally (logits[t] is scored against labels[t + 1])."""
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, e in enumerate(examples):
        p, r = len(e.prompt_ids), len(e.response_ids)
        input_ids[row, :p + r] = torch.tensor(e.prompt_ids + e.response_ids, dtype=torch.long)
        attention_mask[row, :p + r] = 1
        labels[row, p:p + r] = torch.tensor(e.response_ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every example of a JSONL file or directory as chat messages (the last one the answer),
    without tokenizing: for clients that send the prompts to a server."""
    out = []
    for file in _data_files(Path(path)):
        for number, line in enumerate(file.read_bytes().splitlines(), start=1):
            if line.strip():
                try:
                    out.append(_parse_line(line))
                except _BadLine as exc:
                    raise DataError(f"{file.name}:{number}: {exc}") from None
    return out


def _data_files(path: Path) -> list[Path]:
    """The .jsonl files `path` names: itself, or a directory's *.jsonl sorted by name."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{path.name}: directory has no .jsonl files")
        return files
    if not path.is_file():
        raise DataError(f"{path.name}: no such file")
    return [path]


def _parse_line(line: bytes) -> list[dict[str, str]]:
    """One line -> validated chat messages, the last one the assistant's answer."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _BadLine(f"not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise _BadLine(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
    forms = [form for form, keys in _FORM_KEYS.items() if keys & obj.keys()]
    if len(forms) != 1:
        found = "no" if not forms else "mixed " + " and ".join(forms)
        raise _BadLine(f"unknown form ({found} keys); expected 'messages', 'instruction'/'output' "
                       f"or 'prompt'/'completion'")
    if forms[0] == "chat":
        return _chat_messages(obj["messages"])
    if forms[0] == "instruction":
        user = _text(obj, "instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _BadLine(f"field 'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            user += "\n\n" + extra
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj, "output")}]
    return [{"role": "user", "content": _text(obj, "prompt")},
            {"role": "assistant", "content": _text(obj, "completion")}]


def _text(obj: dict[str, Any], key: str, where: str = "") -> str:
    """obj[key], required to be a string with something other than whitespace in it."""
    if key not in obj:
        raise _BadLine(f"missing field '{key}'{where}")
    value = obj[key]
    if not isinstance(value, str):
        raise _BadLine(f"field '{key}'{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadLine(f"field '{key}'{where} is empty")
    return value


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    """Validate a chat form's message list: roles known, contents non-empty strings, answer last."""
    if not isinstance(messages, list) or not messages:
        raise _BadLine("field 'messages' must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        where = f" in message {i}"
        if not isinstance(message, dict):
            raise _BadLine(f"message {i} must be an object, got {type(message).__name__}")
        role = _text(message, "role", where)
        if role not in ROLES:
            raise _BadLine(f"unknown role {role!r} in message {i}; expected one of {', '.join(ROLES)}")
        checked.append({"role": role, "content": _text(message, "content", where)})
    if checked[-1]["role"] != "assistant":
        raise _BadLine(f"last message must be the assistant's answer, got role {checked[-1]['role']!r}")
    return checked


def _tokenize(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids): see `loraserve.trainer.turns`."""
    try:
        prompt_ids, response_text = split_turns(tokenizer, messages)
    except TurnError as e:
        raise _BadLine(str(e)) from None
    response_ids = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    # The assistant turn ends at the template's EOS; anything a template renders after it (a
    # newline, say) belongs to the next turn. A template that renders no EOS gets one appended,
    # so the model learns to stop.
    if eos in response_ids:
        response_ids = response_ids[:response_ids.index(eos) + 1]
    else:
        response_ids.append(eos)
    if len(response_ids) <= 1:
        raise _BadLine("the response is empty after tokenization")
    return prompt_ids, response_ids


def _truncate(prompt_ids: list[int], response_ids: list[int], max_seq_length: int) -> tuple[list[int], list[int]]:
    """Fit an example into `max_seq_length` tokens. The response is kept whole if it fits beside
    at least one prompt token, and the prompt is cut from the left (its oldest tokens, BOS and
    system prompt first, go); otherwise the prompt keeps only its last token and the response
    is cut at the end (losing its EOS). One prompt token always stays because a causal LM scores
    token t from tokens before it: with no prompt the first response token would go untrained."""
    keep_prompt = min(len(prompt_ids), max(1, max_seq_length - len(response_ids)))
    return prompt_ids[len(prompt_ids) - keep_prompt:], response_ids[:max_seq_length - keep_prompt]
