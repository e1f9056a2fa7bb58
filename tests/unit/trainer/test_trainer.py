"""The trainer end to end on a tiny base: it learns, the server serves the adapter exactly as
trained, a resumed run equals an uninterrupted one, and failures leave nothing behind."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.devtools.server_process import running_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.lora.peft_compat import keep_module_targets
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.data import DataError, load_examples, split_examples
from loraserve.trainer.train import train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    base = init_model(root / "base", "deepseek-v3", "tiny", seed=0)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rows = [{"prompt": f"What is the code for item {i}?",
             "completion": f"Item {i} code is {rng.choice(words)}-{rng.randint(10, 99)}."} for i in range(40)]
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": base, "data": data, "rows": rows}


def _config(task, out, **overrides) -> TrainConfig:
    values = dict(model=str(task["base"]), quantization="nf4", train_file=str(task["data"]), adapter_name="codes",
                  output_dir=str(out), r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=3e-3, epochs=60,
                  batch_size=8, eval_fraction=0.2, logging_steps=50, gradient_checkpointing=False, seed=7)
    values.update(overrides)
    return TrainConfig(**values)


# The learning tests train plain LoRA: bitsandbytes 0.50 registers no autograd kernel for its
# CPU 4-bit GEMV, and torch warns that gradients through it may be wrong; QLoRA (NF4) training
# is exercised by the resume test and on GPU hosts.
LEARN_QUANTIZATION = "none"


@pytest.fixture(scope="module")
def trained(task):
    return train(_config(task, task["root"] / "out", quantization=LEARN_QUANTIZATION, learning_rate=1e-2, epochs=150))


def _greedy(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def _reference_model(task, adapter_dir):
    base = load_base(BaseModelConfig(str(task["base"]), quantization=LEARN_QUANTIZATION))
    with keep_module_targets():
        return PeftModel.from_pretrained(base.model, adapter_dir), base.tokenizer


@pytest.mark.slow
def test_training_learns_the_task(task, trained):
    metrics = trained.manifest["metrics"]
    assert metrics["eval_loss"] <= metrics["initial_eval_loss"] / 2
    model, tokenizer = _reference_model(task, trained.adapter_dir)
    examples, _ = load_examples(task["data"], tokenizer, 256)
    train_split, eval_split = split_examples(examples, 0.2, 7)  # the trainer's own split (seed 7)
    assert len(train_split) == 32 and len(eval_split) == 8
    exact = sum(_greedy(model, tokenizer, e.prompt_ids, len(e.response_ids)) == e.response_ids for e in train_split)
    assert exact >= 0.95 * len(train_split), f"{exact} of 32 training answers reproduced exactly"
    manifest = json.loads((trained.adapter_dir / "manifest.json").read_text())
    assert manifest["base_fingerprint"].startswith("sha256:") and manifest["dataset"]["train"]["examples"] == 40
    assert manifest["peak_memory_bytes"]["host_rss"] > 0 and manifest["versions"]["peft"]
    assert sorted(p.name for p in trained.adapter_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]


@pytest.mark.slow
def test_served_exactly_as_trained(task, trained, tmp_path):
    model, tokenizer = _reference_model(task, trained.adapter_dir)
    examples, _ = load_examples(task["data"], tokenizer, 256)
    with running_server(tmp_path, task["base"], tmp_path / "store", "--quantization", LEARN_QUANTIZATION,
                        "--import-roots", str(trained.adapter_dir.parent)) as srv:
        from loraserve.proto.v1 import adapters_pb2 as apb

        srv.adapters.RegisterAdapter(apb.RegisterAdapterRequest(name="codes", path="codes"))
        train_split, _ = split_examples(examples, 0.2, 7)
        by_source = {e.source: e for e in train_split}
        for row, example in [(task["rows"][int(s.rsplit(":", 1)[1]) - 1], e) for s, e in by_source.items()][:6]:
            n = len(example.response_ids)
            msgs = ipb.Messages(messages=[ipb.ChatMessage(role="user", content=row["prompt"])])
            for adapter in ("codes", ""):
                req = ipb.GenerateRequest(input=ipb.GenerationInput(
                    adapter=adapter, messages=msgs, sampling=ipb.SamplingParams(max_new_tokens=n)))
                served = list(srv.inference.Generate(req, timeout=60).summary.token_ids)
                if adapter:
                    assert served == _greedy(model, tokenizer, example.prompt_ids, n)[:len(served)]
                    assert served == example.response_ids  # and it is the trained answer
                else:
                    assert served != example.response_ids  # the base alone does not know it


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt("simulated Ctrl-C right after a checkpoint")


@pytest.mark.parametrize("extra", [{}, {"routed_experts": True, "target": "attention", "lora_dropout": 0.1}],
                         ids=["all-linear", "qlora-routed-experts"])
def test_resume_gives_the_same_adapter_and_interrupts_leave_nothing(task, tmp_path, extra):
    common = dict(epochs=1, max_steps=8, save_steps=4, eval_fraction=0.0, learning_rate=1e-3, **extra)
    whole = train(_config(task, tmp_path / "a", **common))
    with pytest.raises(KeyboardInterrupt):
        train(_config(task, tmp_path / "b", **common), callbacks=[_StopAt(4)])
    assert not (tmp_path / "b" / "codes").exists()  # no adapter from the interrupted run
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".tmp")]
    resumed = train(_config(task, tmp_path / "b", resume=True, **common))
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_bad_data_is_a_clear_error_and_writes_nothing(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        train(_config(task, tmp_path / "out", train_file=str(bad)))
    assert not (tmp_path / "out" / "codes").exists()


def test_targets_the_server_cannot_serve_are_refused(task, tmp_path):
    from loraserve.errors import AdapterIncompatible

    with pytest.raises(AdapterIncompatible, match="server does not serve"):
        train(_config(task, tmp_path / "out", target=r"(lm_head|.*\.o_proj)", max_steps=1))
    with pytest.raises(AdapterIncompatible, match="matches no module"):
        train(_config(task, tmp_path / "out", target=r".*\.no_such_proj", max_steps=1))
    assert not (tmp_path / "out" / "codes").exists()


def test_export_merged_matches_the_adapter(task, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from loraserve.trainer.export import export_merged

    out = export_merged(str(task["base"]), trained.adapter_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    model, tokenizer = _reference_model(task, trained.adapter_dir)
    ids = torch.tensor([tokenizer("What is the code for item 3?").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").exists()
    with pytest.raises(FileExistsError):
        export_merged(str(task["base"]), trained.adapter_dir, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_peak_accelerator_memory_is_below_lora(tmp_path):
    """QLoRA's memory saving where it can be measured: on the `small` dense base, training with
    the NF4 base (QLoRA) peaks lower in GPU memory than with the bf16 base (LoRA)."""
    base = init_model(tmp_path / "small", "deepseek-llm", "small", seed=0)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}?", "completion": f"Code {i}."}) + "\n"
                            for i in range(32)))
    peaks = {}
    for quantization in ("nf4", "none"):
        result = train(TrainConfig(model=str(base), quantization=quantization, train_file=str(data),
                                   adapter_name=f"m-{quantization}", output_dir=str(tmp_path / "out"),
                                   max_steps=10, batch_size=4, eval_fraction=0.0))
        peaks[quantization] = result.manifest["peak_memory_bytes"]["accelerator"]
    assert peaks["nf4"] < peaks["none"], peaks
