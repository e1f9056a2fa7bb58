"""The engine's outputs are exactly what PEFT gives each request alone, whatever the batch holds.

Real tiny DeepSeek bases (V3, V2, LLM), real PEFT adapters of varied rank, alpha, rsLoRA and
targets, the product's NF4 quantization and the unquantized base. References come from PEFT
(or plain transformers for the base) on a fresh load of the same base, one request at a time.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import torch
from model_fixtures import (
    ADAPTER_SPECS,
    PROMPTS,
    PeftReference,
    collect,
    finished_at,
    greedy_request,
    running_engine,
)
from transformers import AutoTokenizer

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.devtools.synthetic_base import ARCHS
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.request import FinishEvent, GenerationRequest, TokenEvent
from loraserve.engine.runner import ModelRunner
from loraserve.lora.adapter import parse_adapter
from loraserve.lora.batch_context import LoraBatchContext
from loraserve.lora.slots import AdapterSlots
from loraserve.lora.wrapping import wrap_model
from loraserve.store.peft_files import read_adapter_dir

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "窦性心律不齐是什么意思？"}]


# ---- greedy outputs equal PEFT's, per request ------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_token_for_token(base_dirs, adapter_dirs, arch: str, quantization: str) -> None:
    """Base-only requests and nine adapters through four slots, a second wave joining while
    the first decodes: every request's greedy tokens are PEFT's for that request alone."""
    adapters = adapter_dirs(arch)
    names = [spec.name for spec in ADAPTER_SPECS]
    with running_engine(base_dirs[arch], quantization, adapters, max_loras=4, max_cpu_loras=16) as engine:
        chat_ids = engine.encode(messages=CHAT)
        ids = [engine.encode(p) for p in PROMPTS]
        # (adapter, prompt ids, new tokens): lengths differ so rows leave the batch at different steps.
        first_wave = [
            (None, ids[0], 20), (names[0], ids[1], 24), (names[1], ids[2], 16), (names[2], chat_ids, 20),
            (names[3], ids[4], 24), (names[4], ids[3], 12), (names[5], ids[6], 20), (None, ids[5], 16),
        ]  # six distinct adapters for four slots
        second_wave = [
            (names[6], ids[7], 16), (names[7], ids[0], 20), (names[8], ids[5], 12),
            (names[0], ids[6], 16), (None, chat_ids, 12), (names[2], ids[1], 16), (names[3], ids[3], 8),
        ]
        streams = [engine.submit(greedy_request(p, n, a)) for a, p, n in first_wave]
        lead = iter(streams[0])
        for _ in range(3):  # the first wave is decoding before the second arrives
            assert isinstance(next(lead), TokenEvent)
        streams += [engine.submit(greedy_request(p, n, a)) for a, p, n in second_wave]
        results = [collect(s)[1] for s in streams[1:]]
        results.insert(0, next(e for e in lead if isinstance(e, FinishEvent)))
        stats = engine.stats()

    assert stats.slot_evictions_total > 0, "nine adapters through four slots must evict"
    assert stats.slot_loads_total >= len(names)
    reference = PeftReference(base_dirs[arch], quantization)
    for (adapter, prompt, n), finish in zip(first_wave + second_wave, results):
        assert finish.finish_reason == "length" and finish.adapter == adapter
        expected = reference.greedy(adapters[adapter] if adapter else None, prompt, n)
        assert finish.token_ids == expected, f"{arch}/{quantization} adapter={adapter} prompt={prompt[:6]}..."


# 3 slots give a small slots x rank product; 33 slots x rank 64 a large one (2,112 columns, over
# the layers' dense limit of 2,048), as a many-adapter deployment has: the batched layers use a
# different path for each.
@pytest.mark.parametrize("max_loras", [3, 33])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_logits_match_peft_unquantized(base_dirs, adapter_dirs, arch: str, max_loras: int) -> None:
    """Logits of the batched LoRA layers equal PEFT's per row: a padded prefill mixing slot 0
    and two adapters, decode steps, a second prefill joining mid-decode (one adapter in two
    rows), rows dropped so one adapter remains beside a base row."""
    adapters = adapter_dirs(arch)
    base = load_base(BaseModelConfig(model=str(base_dirs[arch]), quantization="none"))
    context = LoraBatchContext()
    layers = wrap_model(base.model, max_loras + 1, 64, context, base.dtype)
    base_shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    slots = AdapterSlots(layers, max_loras)
    slot_of = {None: 0}
    for name in ("att-r8-rs", "mlp-r8", "all-r16"):
        config, tensors, _ = read_adapter_dir(adapters[name], name)
        slot_of[name] = slots.acquire(name, parse_adapter(name, config, tensors, base_shapes, 64, base.dtype))
    assert sorted(slot_of.values()) == [0, 1, 2, 3]
    runner = ModelRunner(base.model, context)
    tokenizer = base.tokenizer
    reference = PeftReference(base_dirs[arch], "none")
    rows: list[tuple[str | None, list[int]]] = []  # (adapter, token ids so far), in batch order

    def check(adapter: str | None, token_ids: list[int], logits: torch.Tensor) -> None:
        expected = reference.next_token_logits(adapters[adapter] if adapter else None, token_ids)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{arch} adapter={adapter} after {len(token_ids)} tokens: {m}")
        if adapter is not None:  # the comparison means something only if the adapter matters
            assert (expected - reference.next_token_logits(None, token_ids)).abs().max() > 1e-2

    def prefill(joining: list[tuple[str | None, str]]) -> None:
        prompts = [tokenizer(prompt).input_ids for _, prompt in joining]
        regions = [runner.reserve(len(ids) + 16) for ids in prompts]
        logits = runner.prefill(prompts, [slot_of[a] for a, _ in joining], regions)  # [n, V]
        assert logits.shape == (len(joining), base.model.config.vocab_size)
        for (adapter, _), ids, row_logits in zip(joining, prompts, logits):
            check(adapter, ids, row_logits)
            rows.append((adapter, ids + [int(row_logits.argmax())]))

    def decode(steps: int) -> None:
        for _ in range(steps):
            logits = runner.decode([ids[-1] for _, ids in rows], [slot_of[a] for a, _ in rows])  # [B, V]
            assert logits.shape == (len(rows), base.model.config.vocab_size)
            for (adapter, ids), row_logits in zip(rows, logits):
                check(adapter, ids, row_logits)
            rows[:] = [(a, ids + [int(row_logits.argmax())]) for (a, ids), row_logits in zip(rows, logits)]

    prefill([(None, PROMPTS[0]), ("att-r8-rs", PROMPTS[1]), ("mlp-r8", PROMPTS[7])])  # lengths differ: padded
    decode(2)
    prefill([("all-r16", PROMPTS[6]), ("att-r8-rs", PROMPTS[2]), (None, PROMPTS[3])])
    decode(2)
    prefill([("all-r16", PROMPTS[5])])  # one prompt, one adapter
    decode(1)
    # Keep base, att-r8-rs, att-r8-rs (a single adapter beside a base row): the others leave, and
    # the order the runner reports is the one its rows now have.
    order = runner.remove_rows({2, 3, 5, 6})
    assert order == [0, 1, 4]
    rows[:] = [rows[i] for i in order]
    decode(2)
    prefill([("mlp-r8", PROMPTS[4]), (None, PROMPTS[0] + " and more words to be longer than every row")])
    decode(2)  # a prompt longer than every row joined: each row still attends to its own tokens only
    order = runner.remove_rows({0})
    rows[:] = [rows[i] for i in order]
    decode(1)


# ---- base isolation --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_base_requests_unaffected_by_adapter_batch_mates(base_dirs, adapter_dirs, arch: str) -> None:
    """Base-only requests give the same tokens with no adapter registered, and in one batch
    with four resident adapters in use (NF4, MoE routing included), as plain transformers."""
    adapters = adapter_dirs(arch)
    n = 24
    with running_engine(base_dirs[arch], "nf4") as engine:
        prompts = [engine.encode(p) for p in PROMPTS[:4]]
        alone = [engine.submit(greedy_request(p, n)) for p in prompts]
        alone_ids = [collect(s)[1].token_ids for s in alone]
        assert engine.adapters() == []

    names = ["att-r4", "mlp-r8", "all-r16", "att-r8-rs"]
    with running_engine(base_dirs[arch], "nf4", {k: adapters[k] for k in names}, max_loras=4) as engine:
        adapter_requests = [greedy_request(p, 3 * n, name) for name, p in zip(names, prompts)]
        adapter_streams = [engine.submit(r) for r in adapter_requests]
        leads = [iter(s) for s in adapter_streams]
        for lead in leads:  # every adapter request is decoding before the base ones arrive
            assert isinstance(next(lead), TokenEvent)
        base_requests = [greedy_request(p, n) for p in prompts]
        base_streams = [engine.submit(r) for r in base_requests]
        base_results = [collect(s)[1] for s in base_streams]
        adapter_results = [next(e for e in lead if isinstance(e, FinishEvent)) for lead in leads]
        assert sorted(engine.stats().slots_resident) == sorted(names)

    # They really shared decode steps: each base request ran while every adapter request did.
    adapters_done = min(finished_at(r, f) for r, f in zip(adapter_requests, adapter_results))
    for request, finish in zip(base_requests, base_results):
        assert finished_at(request, finish) < adapters_done
    reference = PeftReference(base_dirs[arch], "nf4")
    for prompt, lone, mixed, with_adapter in zip(prompts, alone_ids, base_results, adapter_results):
        assert mixed.token_ids == lone
        assert lone == reference.greedy(None, prompt, n)
        assert with_adapter.token_ids[:n] != lone, "the adapters must change outputs for this test to mean anything"


# ---- seeded sampling -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_is_independent_of_the_batch(base_dirs, adapter_dirs, arch: str) -> None:
    """A seeded request (temperature 0.8, top_p 0.9, top_k 50, seed 1234) gives the same tokens
    alone and inside a mixed batch of sampled and greedy requests on other adapters; other
    seeds give other tokens."""
    adapters = adapter_dirs(arch)
    n = 40
    sampled = {"temperature": 0.8, "top_p": 0.9, "top_k": 50}
    with running_engine(base_dirs[arch], "nf4", adapters, max_loras=4) as engine:
        prompt = engine.encode(PROMPTS[0])

        def seeded(seed: int, adapter: str | None = "all-r16") -> GenerationRequest:
            return greedy_request(prompt, n, adapter, seed=seed, **sampled)

        alone = collect(engine.submit(seeded(1234)))[1].token_ids
        base_alone = collect(engine.submit(seeded(1234, None)))[1].token_ids

        others = [
            greedy_request(engine.encode(PROMPTS[1]), n, "att-r4", seed=7, **sampled),
            greedy_request(prompt, n, "mlp-r8", seed=1234, temperature=1.3, top_p=0.7),
            greedy_request(engine.encode(PROMPTS[2]), n, "att-r8-rs"),
            greedy_request(prompt, n, None),
            greedy_request(engine.encode(PROMPTS[5]), 2 * n, "mlp-r4", seed=99, **sampled),
        ]
        other_streams = [engine.submit(r) for r in others]
        lead = iter(other_streams[-1])
        for _ in range(2):  # join a batch that is already decoding
            assert isinstance(next(lead), TokenEvent)
        mixed_streams = [engine.submit(seeded(1234)), engine.submit(seeded(1234, None))]
        late = engine.submit(greedy_request(engine.encode(PROMPTS[3]), n, "all-r8-a32", seed=5, **sampled))
        twin = engine.submit(seeded(1234))  # the same seed twice in one batch: two identical draws
        mixed = [collect(s)[1].token_ids for s in mixed_streams]
        assert collect(twin)[1].token_ids == alone
        collect(late)
        for s in other_streams[:-1]:
            collect(s)
        next(e for e in lead if isinstance(e, FinishEvent))

        other_seeds = [collect(engine.submit(seeded(seed)))[1].token_ids for seed in (1235, 4321, 0)]

    assert mixed == [alone, base_alone]
    assert alone != base_alone
    for tokens in other_seeds:
        assert tokens != alone
    assert len({tuple(t) for t in other_seeds}) == 3


# ---- streaming text --------------------------------------------------------------------------

CHINESE_PROMPTS = ("患者主诉胸闷三天", "诊断：高血压病二级，", "根据《中华人民共和国民法典》")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _check_stream(tokenizer, pieces: list[TokenEvent], finish: FinishEvent, eos_id: int) -> tuple[bool, bool]:
    """Assert the streaming invariants of one finished request; returns (its FFFD-free region
    has non-ASCII text, a character there was completed across tokens after being held)."""
    texts = [p.text for p in pieces]
    assert "".join(texts) == finish.text
    assert [t for p in pieces for t in p.token_ids] == finish.token_ids
    for text in texts:
        text.encode("utf-8")  # raises on a lone surrogate
    decoded = tokenizer.decode([t for t in finish.token_ids if t != eos_id], skip_special_tokens=True)
    if "\ufffd" not in decoded:
        assert finish.text == decoded
    # Wherever the decode of the tokens so far is clean, exactly it has been shown: nothing
    # held back longer than a character needs, no partial character shown early.
    shown, so_far, non_ascii, held, completed = "", [], False, False, False
    for piece in pieces:
        shown += piece.text
        so_far += piece.token_ids
        decoded = tokenizer.decode(so_far, skip_special_tokens=True)
        if "\ufffd" in decoded[:-1]:
            break  # the model emitted invalid bytes: the exact region ends here
        if decoded.endswith("\ufffd"):
            held = True  # an incomplete character: it must not be shown yet
            assert shown == decoded[:-1][: len(shown)] and "\ufffd" not in shown
            continue
        assert shown == decoded
        if _NON_ASCII.search(piece.text):
            non_ascii = True
            completed = completed or held
        held = False
    return non_ascii, completed


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_chinese_pieces_are_whole_characters(base_dirs, adapter_dirs, arch: str) -> None:
    """Chinese prompts, several adapters and seeds, 64 tokens each: every piece is valid text,
    the pieces join to the final text, and that text is the tokenizer's decode of the tokens."""
    adapters = adapter_dirs(arch)
    with running_engine(base_dirs[arch], "nf4", adapters, max_loras=4, max_batch_size=64) as engine:
        requests = [
            greedy_request(engine.encode(prompt), 64, adapter, **({"temperature": 1.0, "seed": seed} if seed else {}))
            for prompt in CHINESE_PROMPTS
            for adapter in (None, "att-r4", "all-r16", "mlp-r8")
            for seed in (None, 1, 2, 3, 4, 5, 6, 7)
        ]
        streams = [engine.submit(r) for r in requests]
        results = [collect(s) for s in streams]
        eos_id = engine.tokenizer.eos_token_id
        checks = [_check_stream(engine.tokenizer, pieces, finish, eos_id) for pieces, finish in results]
    assert any(non_ascii for non_ascii, _ in checks), "no output showed non-ASCII text: the test checks nothing"
    assert any(completed for _, completed in checks), "no multi-token character was held and completed"


def test_async_stream_of_chinese_text(base_dirs, adapter_dirs) -> None:
    """`async for` over a stream bound to a running loop yields the same events as reading it
    synchronously."""
    arch = "deepseek-v3"
    adapters = adapter_dirs(arch)
    with running_engine(base_dirs[arch], "nf4", {"all-r16": adapters["all-r16"]}) as engine:
        prompt = engine.encode(messages=CHAT)
        sync_pieces, sync_finish = collect(engine.submit(greedy_request(prompt, 48, "all-r16")))

        async def read() -> tuple[list[TokenEvent], FinishEvent]:
            stream = engine.submit(greedy_request(prompt, 48, "all-r16"), loop=asyncio.get_running_loop())
            pieces = []
            async for event in stream:
                if isinstance(event, FinishEvent):
                    return pieces, event
                pieces.append(event)
            raise AssertionError("no FinishEvent")

        async_pieces, async_finish = asyncio.run(read())
    assert async_pieces == sync_pieces
    assert async_finish.token_ids == sync_finish.token_ids and async_finish.text == sync_finish.text
    assert _NON_ASCII.search(sync_finish.text)


def _stop_candidates(text: str, length: int) -> list[str]:
    """Substrings of the middle half of `text` that make a fair stop sequence: no U+FFFD, not
    blank, and first occurring after some text. (The output may hold U+FFFD elsewhere: the same
    tokens give the same text, with or without a stop sequence.)"""
    found = []
    for start in range(len(text) // 4, 3 * len(text) // 4 - length):
        stop = text[start:start + length]
        if "\ufffd" not in stop and stop.strip() and text.find(stop) > 0:
            found.append(stop)
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_sequence_ends_generation_before_it(base_dirs, adapter_dirs, arch: str) -> None:
    """A stop string taken from the middle of a greedy output ends the same request there
    (finish_reason stop, text = the prefix before it), and no streamed piece ever shows it."""
    adapters = adapter_dirs(arch)
    never = "\u2603never\u2603"
    with running_engine(base_dirs[arch], "nf4", adapters, max_loras=4) as engine:
        cases = [(adapter, engine.encode(prompt)) for adapter in (None, "att-r4", "all-r16", "mlp-r8")
                 for prompt in PROMPTS[:3] + CHINESE_PROMPTS[:2]]
        full_streams = [engine.submit(greedy_request(ids, 48, adapter)) for adapter, ids in cases]
        fulls = [collect(s)[1] for s in full_streams]
        stopped_cases = []
        for (adapter, ids), full in zip(cases, fulls):
            candidates = _stop_candidates(full.text, 3)
            if candidates:
                stop = candidates[len(candidates) // 2]
                stream = engine.submit(greedy_request(ids, 48, adapter, stop=(never, stop)))
                stopped_cases.append((full, stop, stream))
        unmatched = [engine.submit(greedy_request(ids, 48, adapter, stop=(never,))) for adapter, ids in cases[:4]]
        stopped = [(full, stop, collect(stream)) for full, stop, stream in stopped_cases]
        unmatched_results = [collect(s)[1] for s in unmatched]

    assert len(stopped) >= len(cases) // 2, "too few outputs had a clean stop candidate: the test checks too little"
    for full, stop, (pieces, finish) in stopped:
        prefix = full.text[: full.text.find(stop)]
        assert finish.finish_reason == "stop", stop
        assert finish.text == prefix
        assert "".join(p.text for p in pieces) == prefix
        assert not any(stop in p.text for p in pieces)
        assert finish.token_ids == full.token_ids[: len(finish.token_ids)]
        assert len(finish.token_ids) < len(full.token_ids)
        # The stop is found off the engine thread, a step or two late: no token past it is sent.
        assert [t for p in pieces for t in p.token_ids] == finish.token_ids
        assert finish.completion_tokens == len(finish.token_ids)
    for full, finish in zip(fulls, unmatched_results):  # a stop that never occurs changes nothing
        assert (finish.finish_reason, finish.text, finish.token_ids) == ("length", full.text, full.token_ids)


# ---- the engine's detokenizer on exact byte sequences -----------------------------------------
# A random model emits such sequences only by chance; these pin the two cases found that way.


def _byte_token(tokenizer, byte: int) -> int:
    """Id of the byte-level BPE token for one raw byte (GPT-2's byte-to-unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    if byte in printable:
        char = chr(byte)
    else:
        char = chr(256 + [b for b in range(256) if b not in printable].index(byte))
    return tokenizer.convert_tokens_to_ids(char)


def _stream_through_detokenizer(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token_id in ids:
        pieces.append(detokenizer.add(token_id))
        if detokenizer.stopped:
            break
    pieces.append(detokenizer.flush())
    return pieces, detokenizer


def test_character_after_invalid_bytes_is_not_split(base_dirs) -> None:
    """Invalid bytes, then a 4-byte character split over four tokens: the character must
    come out whole, as the tokenizer decodes it (the held-token limit must not cut it)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["deepseek-v3"])
    ids = [_byte_token(tokenizer, b) for b in b"x\xd8\xd8\xd8\xd8" + "🌋".encode()]
    expected = tokenizer.decode(ids)
    assert expected.endswith("🌋")
    pieces, detokenizer = _stream_through_detokenizer(tokenizer, ids)
    assert "".join(pieces) == detokenizer.text == expected


def test_stop_sequence_is_cut_when_output_ends_inside_a_character(base_dirs) -> None:
    """The last token completes a stop string and starts a character that never completes
    (the request hits max_new_tokens or EOS): the final text still ends before the stop."""
    tokenizer = AutoTokenizer.from_pretrained(base_dirs["deepseek-v3"])
    space_and_lead = tokenizer.convert_tokens_to_ids("\u0120\u00f0\u0141")  # one token: b" \xf0\x9f"
    assert tokenizer.convert_ids_to_tokens(space_and_lead) == "\u0120\u00f0\u0141"
    ids = tokenizer.encode("a", add_special_tokens=False) + [space_and_lead]
    assert tokenizer.decode(ids) == "a \ufffd"
    pieces, detokenizer = _stream_through_detokenizer(tokenizer, ids, stop=("a ",))
    assert "a " not in "".join(pieces)
    assert detokenizer.text == ""
    assert detokenizer.stopped
