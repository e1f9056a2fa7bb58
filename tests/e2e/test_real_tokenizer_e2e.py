"""A base as real DeepSeek-R1 checkpoints are shaped where it matters to the product: V3
architecture at DeepSeek's own MLA dimensions, with R1's real tokenizer files. A real server
counts BOS in raw prompts, applies R1's template to messages, and serves an adapter the bundled
trainer trained on R1-style answers (reasoning, `</think>`, answer)."""

from __future__ import annotations

import json

import pytest
from real_tokenizers import real_tokenizer_dir

from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.proto.v1 import adapters_pb2 as apb
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.train import train

ANSWERS = [(f"What is {a} + {b}?", f"<think>\n{a} plus {b}\n</think>\n\n{a + b}") for a, b in
           [(2, 3), (4, 4), (7, 1), (5, 6), (9, 2), (3, 8)]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("r1")
    base = init_model(root / "base", "deepseek-v3", real_mla=True,
                      tokenizer_dir=real_tokenizer_dir("deepseek-r1", root / "tokenizers"))
    return {"root": root, "base": base}


def _generate(srv, max_new_tokens: int = 4, adapter: str = "", **input_fields):
    return srv.inference.Generate(ipb.GenerateRequest(input=ipb.GenerationInput(
        adapter=adapter, sampling=ipb.SamplingParams(max_new_tokens=max_new_tokens), **input_fields)),
        timeout=120).summary


def _messages(question: str):
    return ipb.Messages(messages=[ipb.ChatMessage(role="user", content=question)])


def test_raw_prompts_count_bos_and_messages_get_r1_s_template(world, tmp_path):
    with running_server(tmp_path, world["base"], tmp_path / "store", "--quantization", "nf4") as srv:
        assert _generate(srv, prompt="你好").usage.prompt_tokens == 2  # BOS + 你好
        # <｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n: 6 tokens of R1's vocabulary
        assert _generate(srv, messages=_messages("hi")).usage.prompt_tokens == 6
        chunks = list(srv.inference.GenerateStream(ipb.GenerateStreamRequest(input=ipb.GenerationInput(
            prompt="你好", sampling=ipb.SamplingParams(max_new_tokens=8))), timeout=120))
        text = "".join(c.delta.text for c in chunks if c.HasField("delta"))
        assert text == chunks[-1].summary.text


@pytest.mark.slow
def test_the_trainer_trains_on_r1_answers_and_the_server_serves_the_adapter(world):
    """Every example used to be refused ("not a prefix": R1's generation prompt opens <think>).
    A tiny random base with R1's 128k vocabulary cannot learn the answers word for word in a
    test's time, so this checks the loop: training takes every example and lowers the loss, the
    adapter registers against the base and answers R1-template messages."""
    root = world["root"]
    data = root / "r1.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in ANSWERS), encoding="utf-8")
    result = train(TrainConfig(model=str(world["base"]), quantization="none", train_file=str(data),
                               adapter_name="sums", output_dir=str(root / "out"), r=16, lora_alpha=32,
                               lora_dropout=0.0, learning_rate=1e-2, epochs=40, batch_size=6, eval_fraction=0.0,
                               logging_steps=10, gradient_checkpointing=False, seed=3))
    metrics = result.manifest["metrics"]
    assert result.manifest["dataset"]["train"]["examples"] == len(ANSWERS)
    assert metrics["final_train_loss"] < metrics["first_train_loss"] - 1.0
    with running_server(root, world["base"], root / "store", "--quantization", "none", "--import-roots",
                        str(root / "out")) as srv:
        srv.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="sums", path=str(result.adapter_dir)),
                                     timeout=120)
        summary = _generate(srv, max_new_tokens=6, adapter="sums", messages=_messages(ANSWERS[0][0]))
        assert summary.adapter == "sums" and summary.usage.completion_tokens >= 1
