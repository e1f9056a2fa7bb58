"""The real DeepSeek tokenizer files through `load_tokenizer`, as the server and the trainer load
them: tokens equal to tokenizer.json's own (transformers 5 swaps in a SentencePiece pipeline for
these files), BOS on raw prompts as tokenizer_config.json asks, chat templates unchanged."""

from __future__ import annotations

import pytest
from real_tokenizers import REAL_TOKENIZERS, real_tokenizer_dir
from tokenizers import Tokenizer

from loraserve.base.tokenizer import load_tokenizer
from loraserve.engine.request import encode_input
from loraserve.errors import FailedPrecondition

TEXTS = ["你好", "Hello world, 1234!", "  leading spaces and\ttabs\nnew lines", "def fib(n):\n    return n < 2",
         "émigré naïve — ℕ ∀x∈ℝ 🙂"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: real_tokenizer_dir(name, root) for name in REAL_TOKENIZERS}


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_tokens_are_tokenizer_json_s_own_with_bos_first(dirs, name):
    tokenizer = load_tokenizer(dirs[name])
    raw = Tokenizer.from_file(str(dirs[name] / "tokenizer.json"))
    bos = tokenizer.bos_token_id
    for text in TEXTS:
        ids = encode_input(tokenizer, prompt=text)
        body = raw.encode(text, add_special_tokens=False).ids
        assert ids == [bos, *body], text
        assert len(body) >= 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "deepseek-v2", "deepseek-r1-distill-qwen-7b"])
def test_messages_get_the_template_s_one_bos(dirs, name):
    tokenizer = load_tokenizer(dirs[name])
    ids = encode_input(tokenizer, messages=[{"role": "user", "content": "Hello world"}])
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert "Hello world" in tokenizer.decode(ids)


def test_r1_generation_prompt_opens_the_reasoning(dirs):
    tokenizer = load_tokenizer(dirs["deepseek-r1"])
    ids = encode_input(tokenizer, messages=[{"role": "user", "content": "2+2?"}])
    assert tokenizer.decode(ids).endswith("<｜Assistant｜><think>\n")


@pytest.mark.parametrize("name", ["deepseek-llm-7b-base"])
def test_a_base_without_a_chat_template_refuses_messages(dirs, name):
    tokenizer = load_tokenizer(dirs[name])
    with pytest.raises(FailedPrecondition, match="no chat template"):
        encode_input(tokenizer, messages=[{"role": "user", "content": "hi"}])
