"""`init_model` toward real checkpoints: the config fields real DeepSeek config.json files carry,
V2/V3 at DeepSeek's own MLA dimensions, and a real tokenizer's files copied as they are."""

from __future__ import annotations

import json

import pytest
import torch
from real_tokenizers import real_tokenizer_dir

from loraserve.base.loading import load_base
from loraserve.config import BaseModelConfig
from loraserve.devtools.synthetic_base import REAL_MLA, init_model, synthetic_config
from loraserve.engine.request import encode_input


@pytest.mark.parametrize("arch, topk_method, scoring", [("deepseek-v3", "noaux_tc", "sigmoid"),
                                                         ("deepseek-v2", "greedy", "softmax")])
def test_routing_fields_are_written_as_real_configs_have_them(tmp_path, arch, topk_method, scoring):
    config = json.loads((init_model(tmp_path / "m", arch) / "config.json").read_text())
    assert (config["topk_method"], config["scoring_func"], config["moe_layer_freq"]) == (topk_method, scoring, 1)


@pytest.mark.parametrize("arch", ["deepseek-v3", "deepseek-v2"])
def test_real_mla_dimensions_at_tiny_width_load_in_nf4_and_generate(tmp_path, arch):
    out = init_model(tmp_path / "m", arch, real_mla=True)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in REAL_MLA} == REAL_MLA
    loaded = load_base(BaseModelConfig(model=str(out), quantization="nf4"))
    attention = loaded.model.model.layers[0].self_attn
    assert attention.kv_a_proj_with_mqa.out_features == 512 + 64
    assert attention.kv_b_proj.in_features == 512
    generated = loaded.model.generate(torch.tensor([[0, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_real_mla_is_refused_for_deepseek_llm():
    with pytest.raises(ValueError, match="deepseek-llm has no MLA"):
        synthetic_config("deepseek-llm", "tiny", 512, real_mla=True)


def test_a_real_tokenizer_is_copied_verbatim_and_sizes_the_model(tmp_path):
    source = real_tokenizer_dir("deepseek-r1", tmp_path / "tokenizers")
    out = init_model(tmp_path / "m", "deepseek-v3", real_mla=True, tokenizer_dir=source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    loaded = load_base(BaseModelConfig(model=str(out), quantization="none"))
    tok = loaded.tokenizer
    config = loaded.model.config
    assert config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert encode_input(tok, prompt="你好") == [tok.bos_token_id, 30594]
    assert tok.decode(encode_input(tok, messages=[{"role": "user", "content": "hi"}])).endswith("<think>\n")
