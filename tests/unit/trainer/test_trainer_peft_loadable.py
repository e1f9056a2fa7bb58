"""A trainer-made adapter loads in plain PEFT (`PeftModel.from_pretrained`, no loraserve code and
no patch) on exactly the modules trained, with every saved tensor and the trainer's own outputs,
on each DeepSeek family; and the server still accepts it.

On DeepSeek V2/V3 PEFT 0.21 re-aims any LoRA target ending in gate_proj/up_proj/down_proj at the
fused routed experts when it loads an adapter, so these tests fail if the trainer's config names
dense MLPs or shared experts as modules (see loraserve.lora.peft_compat)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.synthetic_base import init_model
from loraserve.engine.native import NativeEngine
from loraserve.store.peft_names import PREFIX, lora_modules
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.train import train

FAMILIES = ("deepseek-llm", "deepseek-v2", "deepseek-v3")
DROPOUT = 0.05
# A regex narrower than any leaf name: layer 1's o_proj and its dense MLP or shared expert down_proj.
LAYER_ONE = r".*\.layers\.1\.(self_attn\.o_proj|mlp\.(shared_experts\.)?down_proj)"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-loadable")
    rows = [{"prompt": f"Code of item {i}?", "completion": f"Item {i} is k-{10 + i}."} for i in range(8)]
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bases = {arch: init_model(root / arch, arch, "tiny", seed=0) for arch in FAMILIES}
    return {"data": data, "bases": bases}


class KeepModel(TrainerCallback):
    """Holds on to the trainer's in-memory PeftModel, the reference for the saved adapter."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def _train(task, arch: str, target: str, out):
    kept = KeepModel()
    config = TrainConfig(model=str(task["bases"][arch]), quantization="none", train_file=str(task["data"]),
                         adapter_name="trained", output_dir=str(out), target=target, r=4, lora_alpha=8,
                         lora_dropout=DROPOUT, learning_rate=1e-2, max_steps=3, batch_size=4, eval_fraction=0.0,
                         warmup_ratio=0.0, gradient_checkpointing=False, seed=3)
    result = train(config, callbacks=[kept])
    return result, kept.model.eval()


@pytest.mark.parametrize("target", ["all-linear", "mlp", LAYER_ONE], ids=["all-linear", "mlp", "layer-one"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_plain_peft_loads_the_adapter_as_trained(task, arch, target, tmp_path, single_threaded_torch):
    result, trained = _train(task, arch, target, tmp_path / "out")
    adapter = result.adapter_dir
    saved = load_file(adapter / "adapter_model.safetensors")
    modules = set(lora_modules(saved))
    assert modules == {n.removeprefix(PREFIX) for n in trained.targeted_module_names}
    assert any(m.endswith(("gate_proj", "up_proj", "down_proj")) for m in modules)
    if arch != "deepseek-llm":
        assert any(".shared_experts." in m for m in modules)
    assert result.manifest["hyperparameters"]["lora_dropout"] == DROPOUT

    base = AutoModelForCausalLM.from_pretrained(task["bases"][arch], dtype=trained.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, adapter).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]  # PEFT's missing/unexpected keys
    # PEFT wraps a targeted module, or a targeted `<module>.weight` (the parameter form): either
    # way exactly the modules trained, and no routed expert.
    reached = set(loaded.targeted_module_names) | {
        p.removesuffix(".weight") for p in getattr(loaded, "targeted_parameter_names", [])}
    assert reached == modules
    loaded_state = get_peft_model_state_dict(loaded)
    assert loaded_state.keys() == saved.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded_state[key], tensor, atol=0, rtol=0, msg=key)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], list)  # full module names, never the training regex
    # Dropout is kept wherever PEFT's loader allows it (it refuses any on a parameter target).
    assert config["lora_dropout"] == (0.0 if config.get("target_parameters") else DROPOUT)
    assert set(config["target_modules"]) | {p.removesuffix(".weight") for p in config["target_parameters"] or []} == modules

    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])  # [1, T]
    with torch.no_grad():
        expected = trained(input_ids=ids).logits  # [1, T, V]
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-4)  # it does something

    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(str(task["bases"][arch]), quantization="none"),
                                            max_lora_rank=16))
    assert set(engine.check_adapter("trained", adapter).modules) == modules


@pytest.mark.parametrize("arch", ["deepseek-v2", "deepseek-v3"])
def test_routed_expert_lora_trains_loads_in_plain_peft_and_is_served(task, arch, tmp_path, single_threaded_torch):
    kept = KeepModel()
    config = TrainConfig(model=str(task["bases"][arch]), quantization="none", train_file=str(task["data"]),
                         adapter_name="experts", output_dir=str(tmp_path / "out"), target="attention",
                         routed_experts=True, r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, max_steps=3,
                         batch_size=4, eval_fraction=0.0, warmup_ratio=0.0, gradient_checkpointing=False, seed=3)
    adapter = train(config, callbacks=[kept]).adapter_dir
    trained = kept.model.eval()
    saved = load_file(adapter / "adapter_model.safetensors")
    expert_keys = [k for k in saved if ".mlp.experts." in k]
    assert len(expert_keys) == 4 and all(saved[k].abs().sum() > 0 for k in expert_keys)  # trained, both factors
    config_json = json.loads((adapter / "adapter_config.json").read_text())
    assert config_json["target_parameters"] == ["model.layers.1.mlp.experts.down_proj",
                                                "model.layers.1.mlp.experts.gate_up_proj"]
    assert config_json["lora_dropout"] == 0.0

    base = AutoModelForCausalLM.from_pretrained(task["bases"][arch], dtype=trained.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, adapter).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]
    loaded_state = get_peft_model_state_dict(loaded)
    assert loaded_state.keys() == saved.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded_state[key], tensor, atol=0, rtol=0, msg=key)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        new = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                              eos_token_id=None)[0, ids.shape[1]:].tolist()

    assert _served(task["bases"][arch], "none", adapter, ids[0].tolist(), 8) == new

    from loraserve.trainer.export import export_merged

    merged = AutoModelForCausalLM.from_pretrained(export_merged(str(task["bases"][arch]), adapter, tmp_path / "merged"))
    with torch.no_grad():  # the experts' LoRA merged into the fused weights, as PEFT computes it
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_routed_experts_need_no_dropout_and_an_moe_base(task, tmp_path):
    from loraserve.errors import AdapterIncompatible, ConfigError

    with pytest.raises(ConfigError, match="lora_dropout must be 0 with routed_experts on a none base"):
        TrainConfig(model="m", train_file="t", adapter_name="a", quantization="none", routed_experts=True,
                    lora_dropout=0.05)
    TrainConfig(model="m", train_file="t", adapter_name="a", quantization="nf4", routed_experts=True, lora_dropout=0.05)
    config = TrainConfig(model=str(task["bases"]["deepseek-llm"]), quantization="none", train_file=str(task["data"]),
                         adapter_name="x", output_dir=str(tmp_path), routed_experts=True, lora_dropout=0.0,
                         max_steps=1, eval_fraction=0.0)
    with pytest.raises(AdapterIncompatible, match="no fused routed MoE experts"):
        train(config)


@pytest.mark.parametrize("arch", ["deepseek-v2", "deepseek-v3"])
def test_qlora_on_4bit_experts_loads_in_plain_peft_and_is_served(task, arch, tmp_path, single_threaded_torch):
    """With nf4 the experts stay 4-bit while training (trainer/expert_lora.py), dropout included;
    the adapter is saved in PEFT's ParamWrapper layout: plain PEFT on the experts' dequantized
    values computes the trainer's logits, and the native engine serves PEFT's tokens."""
    from model_fixtures import DequantizedExpertsReference

    from loraserve.trainer.expert_lora import FourBitExpertsLora

    kept = KeepModel()
    config = TrainConfig(model=str(task["bases"][arch]), quantization="nf4", train_file=str(task["data"]),
                         adapter_name="qlora-experts", output_dir=str(tmp_path / "out"), target="attention",
                         routed_experts=True, r=4, lora_alpha=8, lora_dropout=DROPOUT, learning_rate=1e-2, max_steps=3,
                         batch_size=4, eval_fraction=0.0, warmup_ratio=0.0, gradient_checkpointing=True, seed=3)
    result = train(config, callbacks=[kept])
    adapter, trained = result.adapter_dir, kept.model.eval()
    assert any(isinstance(m, FourBitExpertsLora) for m in trained.modules())
    assert not [n for n, _ in trained.named_parameters() if ".mlp.experts." in n and "lora_" not in n]  # 4-bit buffers
    saved = load_file(adapter / "adapter_model.safetensors")
    expert_keys = sorted(k for k in saved if ".mlp.experts." in k)
    assert [k.removeprefix(PREFIX + "model.layers.1.mlp.") for k in expert_keys] == [
        "experts.base_layer.lora_A.weight", "experts.base_layer.lora_B.weight",
        "experts.lora_A.weight", "experts.lora_B.weight"]
    assert all(saved[k].abs().sum() > 0 for k in expert_keys)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    assert written["lora_dropout"] == 0.0 and result.manifest["hyperparameters"]["lora_dropout"] == DROPOUT

    reference = DequantizedExpertsReference(task["bases"][arch])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = reference.model(adapter)
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3]])  # [1, T]
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-3)

    assert _served(task["bases"][arch], "nf4", adapter, ids[0].tolist(), 8) == reference.greedy(adapter, ids[0].tolist(), 8)


def _served(base, quantization: str, adapter, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens of `adapter` from a native engine on `base`, which must list the routed
    experts among the adapter's modules."""
    from loraserve.engine.request import FinishEvent, GenerationRequest, SamplingParams

    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(str(base), quantization=quantization), max_lora_rank=16))
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= set(
        engine.check_adapter("trained", adapter).modules)
    engine.start()
    try:
        engine.add_adapter("trained", adapter)
        stream = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), adapter="trained"))
        return next(e for e in stream if isinstance(e, FinishEvent)).token_ids
    finally:
        engine.stop(drain_timeout=0)
