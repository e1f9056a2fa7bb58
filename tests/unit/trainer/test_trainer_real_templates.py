"""Training examples with the real DeepSeek tokenizer files: the prompt is what serving sends
(`encode_input`), the response the answer's turn after it, found by position in the template
(R1's generation prompt opens `<think>`; its template drops reasoning from answers); a base with
no chat template trains one-turn examples as raw text with BOS."""

from __future__ import annotations

import json

import pytest
from real_tokenizers import real_tokenizer_dir

from loraserve.base.tokenizer import load_tokenizer
from loraserve.engine.request import encode_input
from loraserve.trainer.data import DataError, load_examples

USER = {"role": "user", "content": "What is 2+2?"}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: load_tokenizer(real_tokenizer_dir(name, root))
            for name in ("deepseek-v3", "deepseek-r1", "deepseek-v2", "deepseek-llm-7b-base")}


def one(tokenizer, tmp_path, obj: dict):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")
    examples, _ = load_examples(path, tokenizer, max_seq_length=4096)
    return examples[0]


def response_text(tokenizer, example) -> str:
    return tokenizer.decode(example.response_ids)


@pytest.mark.parametrize("name, expected", [("deepseek-v3", "4<｜end▁of▁sentence｜>"),
                                            ("deepseek-v2", " 4<｜end▁of▁sentence｜>")])
def test_the_prompt_is_what_serving_sends_and_the_answer_follows(tokenizers, tmp_path, name, expected):
    tok = tokenizers[name]
    system = {"role": "system", "content": "你是医学术语助手。"}
    example = one(tok, tmp_path, {"messages": [system, USER, {"role": "assistant", "content": "4"}]})
    assert example.prompt_ids == encode_input(tok, messages=[system, USER])
    assert response_text(tok, example) == expected
    assert example.response_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("answer", ["<think>\nadd two and two\n</think>\n\n4", "add two and two\n</think>\n\n4"])
def test_r1_trains_the_reasoning_after_the_think_prompt(tokenizers, tmp_path, answer):
    tok = tokenizers["deepseek-r1"]
    example = one(tok, tmp_path, {"messages": [USER, {"role": "assistant", "content": answer}]})
    assert example.prompt_ids == encode_input(tok, messages=[USER])
    assert tok.decode(example.prompt_ids).endswith("<think>\n")
    assert response_text(tok, example) == "add two and two\n</think>\n\n4<｜end▁of▁sentence｜>"
    # </think> is one special token of R1's vocabulary, learnt as the model emits it
    assert tok.convert_tokens_to_ids("</think>") in example.response_ids


def test_r1_past_turns_lose_their_reasoning_as_serving_renders_them(tokenizers, tmp_path):
    tok = tokenizers["deepseek-r1"]
    past = {"role": "assistant", "content": "<think>\nsecret\n</think>\n\n4"}
    messages = [USER, past, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "<think>\nthree and three\n</think>\n\n6"}]
    example = one(tok, tmp_path, {"messages": messages})
    assert example.prompt_ids == encode_input(tok, messages=messages[:-1])
    assert "secret" not in tok.decode(example.prompt_ids)
    assert response_text(tok, example) == "three and three\n</think>\n\n6<｜end▁of▁sentence｜>"


def test_r1_answer_that_does_not_continue_the_think_prompt_is_refused_saying_how(tokenizers, tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:1: .*generation prompt ends with '<think>\\n'.*</think>"):
        one(tokenizers["deepseek-r1"], tmp_path, {"messages": [USER, {"role": "assistant", "content": "4"}]})


def test_a_base_without_a_template_trains_one_turn_as_raw_text(tokenizers, tmp_path):
    tok = tokenizers["deepseek-llm-7b-base"]
    example = one(tok, tmp_path, {"prompt": "The capital of France is", "completion": " Paris."})
    assert example.prompt_ids == encode_input(tok, prompt="The capital of France is")
    assert example.prompt_ids[0] == tok.bos_token_id
    assert response_text(tok, example) == " Paris.<｜end▁of▁sentence｜>"


def test_a_base_without_a_template_refuses_conversations(tokenizers, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "4"}]
    with pytest.raises(DataError, match="no chat template.*one-turn"):
        one(tokenizers["deepseek-llm-7b-base"], tmp_path, {"messages": messages})
