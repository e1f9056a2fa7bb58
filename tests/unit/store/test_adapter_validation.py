"""Every adapter the batched layers cannot serve exactly is refused with a message that names
the adapter, the field and the values; nothing is ever unpickled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.random_adapters import make_random_adapter
from loraserve.devtools.synthetic_base import init_model
from loraserve.engine.native import NativeEngine
from loraserve.errors import AdapterAlreadyExists, AdapterIncompatible, AdapterNotFound, InvalidArgument


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return init_model(tmp_path_factory.mktemp("v3") / "base", "deepseek-v3", "tiny", seed=3)


@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory) -> Path:
    return make_random_adapter(base_dir, tmp_path_factory.mktemp("good") / "a", r=8, target="all-linear", seed=1)


@pytest.fixture(scope="module")
def engine(base_dir) -> NativeEngine:
    # Not started: validation runs on the caller's thread and needs no engine thread.
    return NativeEngine.load(EngineConfig(base=BaseModelConfig(str(base_dir), quantization="none"), max_lora_rank=16))


def _variant(src: Path, dst: Path, config_update: dict | None = None, tensors_update=None) -> Path:
    shutil.copytree(src, dst)
    if config_update is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        config.update(config_update)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if tensors_update is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        tensors = tensors_update(tensors)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_good_adapter_is_accepted(engine, good_adapter):
    checked = engine.check_adapter("good", good_adapter)
    assert checked.rank == 8 and checked.digest.startswith("sha256:")
    assert any("shared_experts" in m for m in checked.modules) and any("kv_b_proj" in m for m in checked.modules)
    weights, digest = engine.read_adapter("good", good_adapter)
    assert digest == checked.digest and tuple(sorted(weights.modules)) == checked.modules


@pytest.mark.parametrize("update, words", [
    ({"use_dora": True}, ["'bad'", "DoRA", "use_dora=true"]),
    ({"modules_to_save": ["lm_head"]}, ["'bad'", "modules_to_save"]),
    ({"bias": "lora_only"}, ["'bad'", 'bias="lora_only"']),
    ({"target_parameters": ["router_logits"]}, ["'bad'", "target_parameters", '["router_logits"]', "gate_up_proj"]),
    ({"target_parameters": ["model.layers.1.mlp.shared_experts.down_proj.weight", "mlp.experts.down_proj",
                            "mlp.gate.e_score_correction_bias"]},
     ["'bad'", '["mlp.gate.e_score_correction_bias"]', "names no parameter"]),
    ({"target_parameters": "down_proj"}, ["'bad'", "target_parameters must be a list", '"down_proj"']),
    ({"r": 32}, ["'bad'", "rank 32", "max_lora_rank 16"]),
    ({"peft_type": "IA3"}, ["'bad'", "peft_type", "IA3"]),
    ({"lora_alpha": "x"}, ["'bad'", "lora_alpha", '"x"']),
    ({"lora_alpha": None}, ["'bad'", "lora_alpha", "null"]),
    ({"lora_alpha": [1]}, ["'bad'", "lora_alpha", "[1]"]),
    ({"lora_alpha": float("inf")}, ["'bad'", "lora_alpha", "inf"]),
    ({"r": True}, ["'bad'", "r must be a positive integer", "true"]),
    ({"rank_pattern": {"o_proj": "8"}}, ["'bad'", "rank_pattern['o_proj']", '"8"']),
    ({"alpha_pattern": [1, 2]}, ["'bad'", "alpha_pattern", "a list"]),
    ({"use_rslora": "yes"}, ["'bad'", "use_rslora", '"yes"']),
    ({"auto_map": {"x": "y"}}, ["'bad'", "auto_map", "load code"]),
    ({"nested": json.loads("[" * 40 + "]" * 40)}, ["'bad'", "nested more than 32"]),
])
def test_unsupported_config_is_refused(engine, good_adapter, tmp_path, update, words):
    path = _variant(good_adapter, tmp_path / "bad", config_update=update)
    with pytest.raises(AdapterIncompatible) as info:
        engine.check_adapter("bad", path)
    for word in words:
        assert word in info.value.message, info.value.message
    assert str(tmp_path) not in info.value.message


def _rename_first(old_part: str, new_part: str):
    def update(tensors):
        out = {}
        for key, value in tensors.items():
            out[key.replace(old_part, new_part, 1) if old_part in key else key] = value
        return out
    return update


def test_lm_head_target_is_refused(engine, good_adapter, tmp_path):
    def add_head(tensors):
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(512, 8)
        return tensors
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=add_head)
    with pytest.raises(AdapterIncompatible, match="lm_head"):
        engine.check_adapter("bad", path)


def test_embedding_lora_is_refused(engine, good_adapter, tmp_path):
    def add_embedding(tensors):
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 512)
        return tensors
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=add_embedding)
    with pytest.raises(AdapterIncompatible, match="embedding"):
        engine.check_adapter("bad", path)


def test_per_expert_module_lora_is_refused(engine, good_adapter, tmp_path):
    def add_expert(tensors):
        tensors["base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_A.weight"] = torch.zeros(8, 64)
        tensors["base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_B.weight"] = torch.zeros(64, 8)
        return tensors
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=add_expert)
    with pytest.raises(AdapterIncompatible, match="routed MoE experts"):
        engine.check_adapter("bad", path)


def test_module_the_base_lacks_is_refused(engine, good_adapter, tmp_path):
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=_rename_first("layers.0.", "layers.9."))
    with pytest.raises(AdapterIncompatible, match=r"layers\.9\..*does not have"):
        engine.check_adapter("bad", path)


def test_shape_mismatch_is_refused(engine, good_adapter, tmp_path):
    def widen(tensors):
        key = next(k for k in tensors if k.endswith("o_proj.lora_A.weight"))
        tensors[key] = torch.zeros(8, 65)
        return tensors
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=widen)
    with pytest.raises(AdapterIncompatible, match=r"o_proj has lora_A \(8, 65\).*expected \(8, 64\)"):
        engine.check_adapter("bad", path)


def test_lora_bias_tensor_is_refused(engine, good_adapter, tmp_path):
    def add_bias(tensors):
        key = next(k for k in tensors if k.endswith("o_proj.lora_B.weight"))
        tensors[key.replace(".weight", ".bias")] = torch.zeros(64)
        return tensors
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=add_bias)
    with pytest.raises(AdapterIncompatible, match="LoRA bias"):
        engine.check_adapter("bad", path)


def test_pickle_is_refused_and_never_opened(engine, good_adapter, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(good_adapter / "adapter_config.json", path)
    # Not a valid pickle at all: if anything tried to unpickle it, it would fail differently.
    (path / "adapter_model.bin").write_bytes(b"\x80\x04 definitely not loaded")
    with pytest.raises(AdapterIncompatible, match="adapter_model.bin.*pickle"):
        engine.check_adapter("pickled", path)


def test_corrupt_files_are_refused(engine, good_adapter, tmp_path):
    path = _variant(good_adapter, tmp_path / "trunc")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterIncompatible, match="not a valid safetensors"):
        engine.check_adapter("trunc", path)
    path = _variant(good_adapter, tmp_path / "json")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterIncompatible, match="not valid JSON"):
        engine.check_adapter("json", path)


def test_json_nested_50k_deep_is_refused_without_a_recursion_error(engine, good_adapter, tmp_path):
    path = _variant(good_adapter, tmp_path / "deep")
    (path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(AdapterIncompatible, match="nested more than 32 levels"):
        engine.check_adapter("deep", path)


def _poison(which: str, value: float, scale: float = 1.0):
    """A tensors update that writes `value` into one element of the first `which` (A or B) tensor
    and multiplies all of that tensor by `scale`."""
    def update(tensors):
        key = next(k for k in sorted(tensors) if k.endswith(f"lora_{which}.weight"))
        tensor = tensors[key].clone() * scale
        tensor[0, 0] = value
        tensors[key] = tensor
        return tensors
    return update


@pytest.mark.parametrize("which, value", [("A", float("nan")), ("B", float("inf")), ("A", float("-inf")),
                                          ("B", float("nan"))])
def test_non_finite_weights_are_refused_naming_the_tensor(engine, good_adapter, tmp_path, which, value):
    path = _variant(good_adapter, tmp_path / "bad", tensors_update=_poison(which, value))
    with pytest.raises(AdapterIncompatible) as info:
        engine.check_adapter("bad", path)
    assert info.value.code == "FAILED_PRECONDITION"
    assert f"lora_{which}.weight" in info.value.message and "not finite in float32" in info.value.message
    assert "base_model.model.model.layers." in info.value.message  # the tensor's own name


def test_a_scaling_that_overflows_the_slot_dtype_is_refused(base_dir, good_adapter, tmp_path):
    """lora_alpha 1e38 at r=8 folds B by 1.25e37: B's values of ~1 become ~1e37, finite in float32;
    1e39 overflows float32 and bfloat16 (same exponent range); 1e5 fits both but not float16,
    the dtype a GPU host may serve in."""
    from loraserve.lora.adapter import parse_adapter
    from loraserve.store.peft_files import read_adapter_dir

    shapes = NativeEngine.load(EngineConfig(base=BaseModelConfig(str(base_dir), quantization="none"))).base.lora_module_shapes

    def check(alpha: float, dtype: torch.dtype) -> None:
        path = _variant(good_adapter, tmp_path / f"a-{alpha:g}-{dtype}".replace("torch.", ""),
                        config_update={"lora_alpha": alpha}, tensors_update=_poison("B", 4.0, scale=1.0))
        config, tensors, _ = read_adapter_dir(path, "big")
        parse_adapter("big", config, tensors, shapes, 64, dtype)

    check(8.0, torch.float16)
    check(1e38 / 4, torch.float32)
    for alpha, dtype in [(1e39, torch.float32), (1e39, torch.bfloat16), (1e5 * 8, torch.float16)]:
        with pytest.raises(AdapterIncompatible) as info:
            check(alpha, dtype)
        name = str(dtype).removeprefix("torch.")
        assert "lora_B.weight times its scaling" in info.value.message and f"not finite in {name}" in info.value.message


def test_rank_and_alpha_patterns_follow_peft(engine, base_dir, tmp_path):
    # PEFT's rank_pattern/alpha_pattern give per-module r and alpha; the scaling must follow.
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "q_a_proj"], init_lora_weights=False,
                        rank_pattern={"o_proj": 8}, alpha_pattern={"o_proj": 32}, use_rslora=True)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "pat")
    weights, _ = engine.read_adapter("pat", tmp_path / "pat")
    o_proj = weights.modules["model.layers.0.self_attn.o_proj"]
    q_a = weights.modules["model.layers.0.self_attn.q_a_proj"]
    assert o_proj.a.shape[0] == 8 and q_a.a.shape[0] == 4
    peft_o = peft_model.base_model.model.model.layers[0].self_attn.o_proj.scaling["default"]
    peft_q = peft_model.base_model.model.model.layers[0].self_attn.q_a_proj.scaling["default"]
    assert o_proj.scaling == pytest.approx(peft_o) and q_a.scaling == pytest.approx(peft_q)
    assert o_proj.scaling == pytest.approx(32 / 8 ** 0.5)


def test_registry_names_and_idempotence(base_dir, good_adapter, tmp_path):
    engine = NativeEngine.load(EngineConfig(base=BaseModelConfig(str(base_dir), quantization="none"), max_lora_rank=16))
    for bad in ["", "-x", "a/b/c", "/x", "t/", "../up", "x" * 129, "名字"]:
        with pytest.raises(InvalidArgument, match="invalid (adapter|tenant) (name|id)"):
            engine.add_adapter(bad, good_adapter)
    assert engine.add_adapter("tenant/a", good_adapter).adapter_id == "tenant/a"  # the server's '<tenant>/<name>' ids
    engine.remove_adapter("tenant/a")
    first = engine.add_adapter("a", good_adapter)
    assert engine.add_adapter("a", good_adapter) == first  # same content: no-op
    other = make_random_adapter(base_dir, tmp_path / "other", r=4, seed=9)
    with pytest.raises(AdapterAlreadyExists):
        engine.add_adapter("a", other)
    replaced = engine.add_adapter("a", other, replace=True)
    assert replaced.version != first.version and replaced.rank == 4
    engine.remove_adapter("a")
    with pytest.raises(AdapterNotFound):
        engine.remove_adapter("a")
    assert engine.adapters() == []
