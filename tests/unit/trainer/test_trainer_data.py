"""Training data: the three line forms, the chat-template split into prompt and response, labels,
bad lines, truncation, the train/eval split and the shipped example sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraserve.devtools.synthetic_base import init_model
from loraserve.devtools.synthetic_tokenizer import EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer
from loraserve.errors import InvalidArgument
from loraserve.trainer.data import DataError, Example, collate, load_examples, split_examples

ARCHS = ("deepseek-v3", "deepseek-llm")
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "trainer" / "examples"

CHAT = {"messages": [{"role": "system", "content": "你是医院的医学术语助手，只解释术语，不做诊断。"},
                     {"role": "user", "content": "什么是窦性心律不齐？"},
                     {"role": "assistant", "content": "心跳随呼吸略有快慢，多为生理性。"}]}
MULTI_TURN = {"messages": [{"role": "user", "content": "Hello!"},
                           {"role": "assistant", "content": "Hi, how can I help?"},
                           {"role": "user", "content": "Convert to JSON: name: Ada"},
                           {"role": "assistant", "content": '{"name": "Ada"}'}]}
INSTRUCTION = {"instruction": "Convert to JSON.", "input": "name: Ada; age: 36", "output": '{"name": "Ada", "age": 36}'}
INSTRUCTION_NO_INPUT = {"instruction": "Write 1250 with a thousands separator.", "output": "1,250"}
PROMPT_COMPLETION = {"prompt": "thanks a ton!", "completion": "Thank you very much.", "id": 3}  # extra keys ignored


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {arch: build_tokenizer(arch, 512) for arch in ARCHS}


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item a dict (dumped as JSON) or a str (written verbatim) on its own line."""
    path.write_text("".join((json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else x) + "\n"
                            for x in lines), encoding="utf-8")
    return path


def full_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_form_splits_into_the_templates_prompt_and_response(tokenizers, tmp_path, arch):
    tok = tokenizers[arch]
    path = write_jsonl(tmp_path / "train.jsonl",
                       [CHAT, "", MULTI_TURN, INSTRUCTION, "   ", INSTRUCTION_NO_INPUT, PROMPT_COMPLETION])
    examples, report = load_examples(path, tok, max_seq_length=512)
    expected_messages = [
        CHAT["messages"],
        MULTI_TURN["messages"],
        [{"role": "user", "content": "Convert to JSON.\n\nname: Ada; age: 36"},
         {"role": "assistant", "content": '{"name": "Ada", "age": 36}'}],
        [{"role": "user", "content": "Write 1250 with a thousands separator."},
         {"role": "assistant", "content": "1,250"}],
        [{"role": "user", "content": "thanks a ton!"}, {"role": "assistant", "content": "Thank you very much."}],
    ]
    assert [e.source for e in examples] == ["train.jsonl:1", "train.jsonl:3", "train.jsonl:4", "train.jsonl:6",
                                            "train.jsonl:7"]
    for example, messages in zip(examples, expected_messages, strict=True):
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert example.prompt_ids == list(prompt)
        assert example.prompt_ids + example.response_ids == full_ids(tok, messages)
        assert example.response_ids[-1] == EOS_TOKEN_ID
        assert tok.decode(example.response_ids, skip_special_tokens=True).strip() == messages[-1]["content"]
    assert (report.examples, report.skipped_lines, report.truncated) == (5, 0, 0)
    assert report.files == [str(path)]


def test_tokenizer_loaded_from_a_model_directory_gives_the_same_examples(tokenizers, tmp_path):
    base = init_model(tmp_path / "base", "deepseek-v3", "tiny", seed=0)
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, INSTRUCTION, PROMPT_COMPLETION])
    loaded, _ = load_examples(path, AutoTokenizer.from_pretrained(base), max_seq_length=512)
    built, _ = load_examples(path, tokenizers["deepseek-v3"], max_seq_length=512)
    assert loaded == built


def test_collate_masks_prompt_and_padding_out_of_the_labels():
    examples = [Example([0, 5, 6], [7, 8, EOS_TOKEN_ID], "a.jsonl:1"), Example([0, 9], [10, EOS_TOKEN_ID], "a.jsonl:2")]
    batch = collate(examples, pad_id=PAD_TOKEN_ID)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 8, 1], [0, 9, 10, 1, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8, 1], [-100, -100, 10, 1, -100, -100]]


def test_collate_labels_on_real_examples(tokenizers, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, INSTRUCTION_NO_INPUT, PROMPT_COMPLETION])
    examples, _ = load_examples(path, tokenizers["deepseek-llm"], max_seq_length=512)
    batch = collate(examples, pad_id=PAD_TOKEN_ID)
    for row, e in enumerate(examples):
        p, r = len(e.prompt_ids), len(e.response_ids)
        labels = batch["labels"][row].tolist()
        assert labels[:p] == [-100] * p
        assert labels[p:p + r] == e.response_ids
        assert labels[p + r:] == [-100] * (batch["labels"].shape[1] - p - r)
        assert batch["attention_mask"][row].sum().item() == p + r


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ({"text": "hello"}, "unknown form"),
    ({"prompt": "a", "output": "b"}, "unknown form (mixed"),
    ({"instruction": "Convert."}, "missing field 'output'"),
    ({"instruction": "Convert.", "output": ""}, "field 'output' is empty"),
    ({"instruction": "Convert.", "output": "  \n"}, "field 'output' is empty"),
    ({"instruction": 3, "output": "x"}, "field 'instruction' must be a string, got int"),
    ({"instruction": "Convert.", "input": ["x"], "output": "x"}, "field 'input' must be a string"),
    ({"prompt": "hi"}, "missing field 'completion'"),
    ({"prompt": "hi", "completion": None}, "field 'completion' must be a string, got NoneType"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant's answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "field 'content' in message 1 is empty"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing field 'content' in message 0"),
    ({"messages": [{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'tool'"),
    ({"messages": ["hi", {"role": "assistant", "content": "x"}]}, "message 0 must be an object"),
]


@pytest.mark.parametrize("line, words", BAD_LINES, ids=[w for _, w in BAD_LINES])
def test_bad_lines_name_file_and_line(tokenizers, tmp_path, line, words):
    path = write_jsonl(tmp_path / "train.jsonl", [PROMPT_COMPLETION, "", line, INSTRUCTION])
    with pytest.raises(DataError, match=r"^train\.jsonl:3: ") as info:
        load_examples(path, tokenizers["deepseek-v3"], max_seq_length=512)
    assert words in info.value.message
    assert isinstance(info.value, InvalidArgument) and info.value.code == "INVALID_ARGUMENT"
    assert str(tmp_path) not in info.value.message  # the file's name, never its directory

    examples, report = load_examples(path, tokenizers["deepseek-v3"], max_seq_length=512, skip_bad_lines=True)
    assert [e.source for e in examples] == ["train.jsonl:1", "train.jsonl:4"]
    assert (report.examples, report.skipped_lines) == (2, 1)


def test_invalid_utf8_is_a_bad_line(tokenizers, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(PROMPT_COMPLETION).encode() + b'\n{"prompt": "\xff", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"^train\.jsonl:2: not valid UTF-8"):
        load_examples(path, tokenizers["deepseek-v3"], max_seq_length=512)


def test_an_empty_dataset_is_an_error(tokenizers, tmp_path):
    tok = tokenizers["deepseek-v3"]
    with pytest.raises(DataError, match="empty.jsonl: no training examples"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]), tok, max_seq_length=512)
    with pytest.raises(DataError, match=r"bad.jsonl: no training examples \(2 bad lines skipped\)"):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"]), tok, max_seq_length=512, skip_bad_lines=True)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_examples(tmp_path / "missing.jsonl", tok, max_seq_length=512)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(tokenizers, tmp_path, arch):
    tok = tokenizers[arch]
    long_prompt = {"prompt": "The quick brown fox jumps over the lazy dog. " * 20, "completion": "Paris."}
    path = write_jsonl(tmp_path / "train.jsonl", [long_prompt, PROMPT_COMPLETION])
    (whole, short), _ = load_examples(path, tok, max_seq_length=4096)
    limit = max(len(whole.response_ids) + 20, len(short.prompt_ids) + len(short.response_ids))  # short fits
    (cut, same), report = load_examples(path, tok, max_seq_length=limit)
    assert report.truncated == 1 and same == short
    assert cut.response_ids == whole.response_ids
    assert cut.prompt_ids == whole.prompt_ids[len(cut.response_ids) - limit:]
    assert len(cut.prompt_ids) + len(cut.response_ids) == limit


def test_truncation_cuts_the_response_end_when_it_alone_is_too_long(tokenizers, tmp_path):
    tok = tokenizers["deepseek-v3"]
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Repeat.", "completion": "blue sky " * 30}])
    (whole,), _ = load_examples(path, tok, max_seq_length=4096)
    (cut,), report = load_examples(path, tok, max_seq_length=16)
    assert report.truncated == 1
    assert cut.prompt_ids == whole.prompt_ids[-1:]  # one prompt token so the first answer token is trained
    assert cut.response_ids == whole.response_ids[:15]
    assert len(cut.prompt_ids) + len(cut.response_ids) == 16


def test_split_is_deterministic_and_disjoint():
    examples = [Example([0], [i, EOS_TOKEN_ID], f"a.jsonl:{i}") for i in range(1, 41)]
    train, evals = split_examples(examples, eval_fraction=0.1, seed=7)
    assert (train, evals) == split_examples(examples, eval_fraction=0.1, seed=7)
    assert len(evals) == 4 and len(train) == 36
    assert {e.source for e in train}.isdisjoint(e.source for e in evals)
    assert sorted(train + evals, key=lambda e: e.response_ids[0]) == examples
    assert split_examples(examples, eval_fraction=0.1, seed=8)[1] != evals
    assert split_examples(examples, eval_fraction=0.0, seed=7) == (examples, [])
    assert len(split_examples(examples[:3], eval_fraction=0.01, seed=7)[1]) == 1  # a nonzero fraction gets one
    with pytest.raises(ValueError, match="eval_fraction"):
        split_examples(examples, eval_fraction=1.0, seed=7)


@pytest.mark.parametrize("name", ["medical_terms_zh.jsonl", "format_conversion.jsonl", "style_formal.jsonl"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_example_sets_load_cleanly(tokenizers, name, arch):
    path = EXAMPLES_DIR / name
    examples, report = load_examples(path, tokenizers[arch], max_seq_length=512)
    assert 32 <= report.examples <= 48 and report.examples == len(examples)
    assert report.skipped_lines == 0 and report.truncated == 0
    assert report.sha256 == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}
    # Short enough for a tiny model to memorise: under 40 answer tokens, EOS not counted.
    assert max(len(e.response_ids) for e in examples) <= 40


def test_a_directory_loads_every_jsonl_in_name_order(tokenizers):
    examples, report = load_examples(EXAMPLES_DIR, tokenizers["deepseek-v3"], max_seq_length=512)
    assert [Path(f).name for f in report.files] == ["format_conversion.jsonl", "medical_terms_zh.jsonl",
                                                    "style_formal.jsonl"]
    assert report.examples == len(examples) == 116
    assert set(report.sha256) == set(report.files)
