"""How loraserve's settings become vLLM's engine arguments and sampling parameters, and which
combinations are refused before vLLM starts (in one line, not a vLLM trace). No engine runs."""

from __future__ import annotations

import json
import shutil

import pytest

from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.engine.choice import VllmOptions, choose_engine
from loraserve.engine.request import SamplingParams
from loraserve.errors import ConfigError

pytestmark = pytest.mark.vllm


def _setup():
    from loraserve.engine import vllm_setup

    return vllm_setup


def _config(base_dir, quantization="none", **limits) -> EngineConfig:
    return EngineConfig(base=BaseModelConfig(model=str(base_dir), quantization=quantization), **limits)


def test_settings_map_onto_vllm_engine_args(base_dirs):
    setup = _setup()
    config = _config(base_dirs["deepseek-llm"], max_loras=3, max_cpu_loras=7, max_lora_rank=32, max_batch_size=12,
                     target_modules=("q_proj", "v_proj"))
    facts = setup.read_base_facts(config.base)
    options = VllmOptions(tensor_parallel_size=2, gpu_memory_utilization=0.5, max_model_len=96,
                          enable_prefix_caching=False)
    args = setup.engine_args(config, options, facts)
    assert (args.max_loras, args.max_cpu_loras, args.max_lora_rank, args.max_num_seqs) == (3, 7, 32, 12)
    assert (args.tensor_parallel_size, args.gpu_memory_utilization, args.max_model_len) == (2, 0.5, 96)
    assert args.enable_prefix_caching is False and args.enable_lora is True and args.quantization is None
    assert args.lora_target_modules == ["q_proj", "v_proj"]
    assert args.served_model_name == [config.base.public_name] and args.model == str(facts.model_dir)
    assert args.enforce_eager is not facts.cuda


def test_target_modules_limit_what_adapters_may_touch(base_dirs):
    setup = _setup()
    facts = setup.read_base_facts(_config(base_dirs["deepseek-llm"]).base)
    kept = setup.restrict_to_targets(facts, ("q_proj", "v_proj"))
    assert kept.lora_module_shapes and {n.rsplit(".", 1)[-1] for n in kept.lora_module_shapes} == {"q_proj", "v_proj"}
    assert setup.restrict_to_targets(facts, None) is facts
    with pytest.raises(ConfigError, match="name no linear layer"):
        setup.restrict_to_targets(facts, ("qkv_projection",))


@pytest.mark.parametrize(("quantization", "limits", "words"), [
    ("int8", {}, "NF4 only, not int8"),
    ("fp4", {}, "NF4 only, not fp4"),
    ("none", {"max_lora_rank": 24}, "max_lora_rank in 8, 16, 32"),
])
def test_what_vllm_cannot_do_is_refused_in_one_line(base_dirs, quantization, limits, words):
    setup = _setup()
    config = _config(base_dirs["deepseek-llm"], quantization, **limits)
    with pytest.raises(ConfigError, match=words):
        setup.engine_args(config, VllmOptions(), setup.read_base_facts(config.base))


def test_nf4_needs_a_gpu_with_vllm(base_dirs):
    setup = _setup()
    config = _config(base_dirs["deepseek-llm"], "nf4")
    facts = setup.read_base_facts(config.base)
    if facts.cuda:
        assert setup.engine_args(config, VllmOptions(), facts).quantization == "bitsandbytes"
    else:
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            setup.engine_args(config, VllmOptions(), facts)


def test_a_pre_quantized_checkpoint_is_served_as_it_comes(base_dirs, tmp_path):
    setup = _setup()
    base = shutil.copytree(base_dirs["deepseek-llm"], tmp_path / "fp8-base")
    config_json = json.loads((base / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config_json))
    facts = setup.read_base_facts(BaseModelConfig(model=str(base), quantization="none"))
    assert facts.checkpoint_quantization == "fp8"
    with pytest.raises(ConfigError, match=r"already quantized \(fp8, in its config.json\), so --quantization nf4 cannot.*--quantization none"):
        setup.engine_args(_config(base, "nf4"), VllmOptions(), facts)
    assert setup.engine_args(_config(base, "none"), VllmOptions(), facts).quantization is None


def test_every_sampling_field_reaches_vllm():
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_new_tokens=17, temperature=0.7, top_p=0.8, top_k=5, repetition_penalty=1.3, seed=42,
                            stop=("END",))
    out = _setup().vllm_sampling(params)
    assert (out.max_tokens, out.temperature, out.top_p, out.top_k, out.repetition_penalty, out.seed) == \
        (17, 0.7, 0.8, 5, 1.3, 42)
    # Stop strings and text stay loraserve's (its detokenizer): vLLM returns token deltas only.
    assert out.stop == [] and out.detokenize is False and out.output_kind == RequestOutputKind.DELTA


def test_auto_picks_native_without_a_gpu_and_says_why():
    import torch

    choice = choose_engine("auto")
    if torch.cuda.is_available():
        assert choice.name == "vllm" and "CUDA device" in choice.reason
    else:
        assert choice == choose_engine("auto") and choice.name == "native"
        assert choice.reason == "auto: no CUDA device is visible (vLLM serves GPU hosts)"
    assert choose_engine("vllm").reason == "asked for (engine: vllm)"
    with pytest.raises(ConfigError, match="not one of native, vllm, auto"):
        choose_engine("tgi")
