"""Pre-quantized checkpoints: an FP8 one as DeepSeek-V3/R1 ship it, a bitsandbytes NF4 one as
save_pretrained writes it. Loaded as they come, a --quantization that cannot apply refused in one
line saying what to use, the real quantization reported, and part of the base's fingerprint."""

from __future__ import annotations

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from quantized_checkpoints import dequantized_fp8, fp8_checkpoint, nf4_checkpoint

from loraserve.base.fingerprint import base_fingerprint
from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.devtools.synthetic_base import init_model
from loraserve.errors import ConfigError


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    base = init_model(root / "base", "deepseek-llm", "tiny", seed=0)
    return {"base": base, "fp8": fp8_checkpoint(base, root / "fp8"), "nf4": nf4_checkpoint(base, root / "nf4")}


@pytest.mark.parametrize("requested", ["nf4", "fp4", "int8"])
def test_fp8_with_a_bitsandbytes_quantization_is_refused_saying_what_to_use(checkpoints, requested):
    with pytest.raises(ConfigError) as info:
        load_base(BaseModelConfig(model=str(checkpoints["fp8"]), quantization=requested))
    message = str(info.value)
    assert "already quantized (fp8, in its config.json)" in message and f"--quantization {requested}" in message
    assert "use --quantization none" in message and "--engine vllm" in message
    assert "\n" not in message


def test_fp8_runs_as_stored_and_reports_it(checkpoints):
    loaded = load_base(BaseModelConfig(model=str(checkpoints["fp8"]), quantization="none"))
    assert loaded.quantization == "fp8 (checkpoint)"
    expected = dequantized_fp8(checkpoints["fp8"])
    weights = dict(loaded.model.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(weights[name].float(), expected[name], rtol=1e-2, atol=1e-3)  # bf16 on CPU
    original = load_base(BaseModelConfig(model=str(checkpoints["base"]), quantization="none"))
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        fp8_logits, logits = loaded.model(ids).logits, original.model(ids).logits
    assert (fp8_logits - logits).abs().max() < 0.1 * logits.abs().max()  # FP8's rounding, not another model


@pytest.mark.parametrize("requested", ["nf4", "none"])
def test_a_bitsandbytes_checkpoint_loads_as_stored(checkpoints, requested):
    loaded = load_base(BaseModelConfig(model=str(checkpoints["nf4"]), quantization=requested))
    assert loaded.quantization == "nf4 (checkpoint)"
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_a_bitsandbytes_checkpoint_refuses_another_kind(checkpoints):
    for requested in ("int8", "fp4"):
        with pytest.raises(ConfigError, match="already quantized \\(nf4, in its config.json\\).*use --quantization none or nf4"):
            load_base(BaseModelConfig(model=str(checkpoints["nf4"]), quantization=requested))


def test_a_plain_checkpoint_reports_the_quantization_applied_at_load(checkpoints):
    assert load_base(BaseModelConfig(model=str(checkpoints["base"]), quantization="nf4")).quantization == "nf4"
    assert load_base(BaseModelConfig(model=str(checkpoints["base"]), quantization="none")).quantization == "none"


def test_the_checkpoints_quantization_config_is_part_of_the_fingerprint(checkpoints, tmp_path):
    copy = shutil.copytree(checkpoints["fp8"], tmp_path / "fp8")
    before = base_fingerprint(copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]  # the same bytes read another way
    (copy / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(copy) != before
