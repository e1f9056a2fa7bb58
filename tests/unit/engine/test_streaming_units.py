"""Incremental detokenization and batched sampling on their own, with a real tokenizer."""

from __future__ import annotations

import pytest
import torch

from loraserve.devtools.synthetic_tokenizer import build_tokenizer
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.request import SamplingParams
from loraserve.engine.sampling import sample_batch
from loraserve.errors import InvalidArgument


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("deepseek-v3", 512)


def _stream(tokenizer, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(detok.add(token))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("text", ["窦性心律不齐是指窦性心律的起源未变", "mixed 中文 and emoji 🫀 text", "plain ascii words"])
def test_deltas_never_split_characters_and_join_to_the_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Byte-level BPE spreads these characters over several tokens: the test must see splits.
    if text != "plain ascii words":
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces, detok = _stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == detok.text


def test_stop_sequence_cuts_output_and_is_never_streamed(tokenizer):
    text = "first part STOP second part"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, detok = _stream(tokenizer, ids, stop=("STOP",))
    assert detok.stopped
    # The joined pieces are exactly the text before the stop: nothing after it was streamed.
    assert "".join(pieces) == "first part " == detok.text


def test_held_prefix_of_a_stop_is_released_when_it_does_not_complete(tokenizer):
    text = "a ST b STOX c"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, detok = _stream(tokenizer, ids, stop=("STOP",))
    assert not detok.stopped and "".join(pieces) == text


def test_stop_inside_chinese(tokenizer):
    text = "心律不齐，窦性心律"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces, detok = _stream(tokenizer, ids, stop=("，",))
    assert detok.stopped and detok.text == "心律不齐"


def _gens(seeds):
    out = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(s)
        out.append(g)
    return out


def test_greedy_and_degenerate_sampling_agree():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    greedy = logits.argmax(-1).tolist()
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=0.7, top_p=1e-6), SamplingParams(temperature=2.0, top_k=1, top_p=0.5)]
    assert sample_batch(logits, params, _gens([1, 2, 3, 4]), None) == greedy


def test_seeded_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    row = torch.randn(1, 300)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7)
    alone = [sample_batch(row, [params], _gens([7]), None)[0]]
    mates = torch.randn(3, 300)
    batch = torch.cat([mates[:1], row, mates[1:]])
    mixed = sample_batch(batch, [SamplingParams(temperature=1.0), params, SamplingParams(), SamplingParams(temperature=0.5)],
                         _gens([1, 7, 2, 3]), None)
    assert mixed[1] == alone[0]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    seen = set()
    for seed in range(200):
        seen.update(sample_batch(logits, [SamplingParams(temperature=5.0, top_k=2)], _gens([seed]), None))
    assert seen == {0, 1}
    seen = set()
    for seed in range(200):
        seen.update(sample_batch(logits, [SamplingParams(temperature=1.0, top_p=0.5)], _gens([seed]), None))
    assert seen == {0}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(2, 50)
    history = torch.tensor([[3, 7, 7, 11], [0, 1, 2, 3]])
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone()).argmax(-1).tolist()
    seen = [torch.zeros(50, dtype=torch.bool) for _ in range(2)]
    for row, ids in zip(seen, history):
        row[ids] = True
    params = [SamplingParams(repetition_penalty=1.5)] * 2
    assert sample_batch(logits, params, _gens([0, 0]), seen) == expected


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 5000}, "over the server limit"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"stop": ("",)}, "stop"),
    ({"stop": tuple(str(i) for i in range(17))}, "stop"), ({"stop": ("x" * 300,)}, "stop"),
    ({"seed": -1}, "seed"),
])
def test_sampling_params_are_validated(kwargs, field):
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**kwargs).validate(max_new_tokens_limit=2048)
