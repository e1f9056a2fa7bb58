"""Base loading shared by server and trainer: quantization, refusals, fingerprint."""

from __future__ import annotations

import shutil

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.base.fingerprint import base_fingerprint
from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.devtools.synthetic_base import init_model
from loraserve.errors import ConfigError


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: init_model(root / arch, arch, "tiny", seed=5) for arch in ("deepseek-v3", "deepseek-llm")}


@pytest.mark.parametrize("quantization, layer_type", [("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit),
                                                      ("none", torch.nn.Linear)])
def test_quantization_reaches_every_linear(bases, quantization, layer_type):
    loaded = load_base(BaseModelConfig(str(bases["deepseek-v3"]), quantization=quantization))
    attn = loaded.model.model.layers[0].self_attn
    assert type(attn.kv_b_proj) is layer_type and type(attn.q_a_proj) is layer_type
    if quantization != "none":
        assert loaded.model.model.layers[0].self_attn.kv_b_proj.weight.quant_state.quant_type == quantization
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.chat_template and loaded.dtype == torch.float32
    assert loaded.fingerprint == base_fingerprint(bases["deepseek-v3"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU hosts")
def test_int8_with_mla_on_cpu_is_refused_clearly(bases):
    with pytest.raises(ConfigError, match="int8 is not supported on CPU for deepseek_v3.*nf4"):
        load_base(BaseModelConfig(str(bases["deepseek-v3"]), quantization="int8"))


def test_fingerprint_tracks_weights_not_file_times(bases, tmp_path):
    src = bases["deepseek-llm"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert base_fingerprint(copy) == base_fingerprint(src)
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert base_fingerprint(copy) != base_fingerprint(src)


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="quantization 'q3'"):
        BaseModelConfig("x", quantization="q3")
    with pytest.raises(ConfigError, match="max_cpu_loras"):
        EngineConfig(base=BaseModelConfig("x"), max_loras=8, max_cpu_loras=4)
    with pytest.raises(ConfigError, match="max_batch_size"):
        EngineConfig(base=BaseModelConfig("x"), max_batch_size=0)
    with pytest.raises(ConfigError, match="not a model directory"):
        load_base(BaseModelConfig(str(tmp_path / "missing.json")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_on_gpu_uses_bf16_compute_and_double_quant(bases):
    loaded = load_base(BaseModelConfig(str(bases["deepseek-v3"]), quantization="nf4"))
    layer = loaded.model.model.layers[0].self_attn.q_a_proj
    assert loaded.dtype == torch.bfloat16 and layer.weight.device.type == "cuda"
    assert layer.weight.quant_state.nested
