"""What the vLLM engine needs before vLLM starts: facts about the base read without loading its
weights here (vLLM's engine core loads them), and vLLM's engine arguments for loraserve's
settings, with the combinations vLLM cannot serve refused in one clear line."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraserve.base.fingerprint import base_fingerprint
from loraserve.base.loading import compute_dtype, resolve_model_dir
from loraserve.base.quantization import checkpoint_quantization, refuse_requantization
from loraserve.config import BaseModelConfig, EngineConfig
from loraserve.engine.choice import VllmOptions
from loraserve.engine.request import SamplingParams
from loraserve.engine.vllm_worker import QUALNAME as PROBE
from loraserve.errors import ConfigError

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts (it sizes its LoRA kernels by them)."""


@dataclass(frozen=True)
class BaseModelFacts:
    model_dir: Path
    fingerprint: str
    model_type: str
    vocab_size: int
    max_context: int | None
    eos_ids: set[int]
    dtype: torch.dtype
    """The compute dtype vLLM runs in (adapters are checked for overflow in it)."""
    lora_module_shapes: dict[str, tuple[int, int]]
    cuda: bool
    checkpoint_quantization: str | None = None
    """The `quant_method` of a pre-quantized checkpoint (fp8, awq, gptq...), from its config.json."""


def read_base_facts(config: BaseModelConfig) -> BaseModelFacts:
    """The base's identity and shapes, from its files: the model is built on the meta device
    (no memory), only to list the linears adapters may target and their shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from loraserve.lora.wrapping import supported_linear_names

    model_dir = resolve_model_dir(config.model)
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=config.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.trust_remote_code)
    shapes = {name: (int(m.in_features), int(m.out_features)) for name, m in supported_linear_names(model).items()}
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = hf_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return BaseModelFacts(model_dir=model_dir, fingerprint=base_fingerprint(model_dir),
                          model_type=hf_config.model_type, vocab_size=int(hf_config.vocab_size),
                          max_context=getattr(hf_config, "max_position_embeddings", None), eos_ids=eos_ids,
                          dtype=compute_dtype(config), lora_module_shapes=shapes, cuda=torch.cuda.is_available(),
                          checkpoint_quantization=checkpoint_quantization(hf_config))


def restrict_to_targets(facts: BaseModelFacts, target_modules: tuple[str, ...] | None) -> BaseModelFacts:
    """The facts with only the modules `target_modules` names (by suffix, as the native engine
    and vLLM's `lora_target_modules` match them): adapters touching others are refused."""
    if target_modules is None:
        return facts
    shapes = {n: s for n, s in facts.lora_module_shapes.items() if n.rsplit(".", 1)[-1] in target_modules}
    if not shapes:
        raise ConfigError(f"target_modules {', '.join(target_modules)} name no linear layer of this base")
    return replace(facts, lora_module_shapes=shapes)


def engine_args(config: EngineConfig, options: VllmOptions, facts: BaseModelFacts):
    """vLLM's AsyncEngineArgs for loraserve's settings (ConfigError for what vLLM cannot do)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    base = config.base
    if base.quantization in ("fp4", "int8"):
        raise ConfigError(f"the vLLM engine quantizes at load with bitsandbytes NF4 only, not {base.quantization}; "
                          "use --quantization nf4 or none (a pre-quantized FP8/AWQ/GPTQ checkpoint: none)")
    stored = facts.checkpoint_quantization
    refuse_requantization(base.model, base.quantization, stored, "vLLM serves it as it comes: use --quantization none")
    if base.quantization == "nf4" and not facts.cuda:
        raise ConfigError("the vLLM engine's NF4 (bitsandbytes) quantization needs a CUDA GPU; on a CPU host use "
                          "--quantization none with --engine vllm, or the native engine")
    if config.max_lora_rank not in VLLM_LORA_RANKS:
        raise ConfigError(f"the vLLM engine takes max_lora_rank in {', '.join(map(str, VLLM_LORA_RANKS))}, "
                          f"got {config.max_lora_rank}")
    max_model_len = options.max_model_len or facts.max_context
    return AsyncEngineArgs(
        model=str(facts.model_dir), tokenizer=str(facts.model_dir), served_model_name=[base.public_name], dtype=str(facts.dtype).removeprefix("torch."),
        quantization="bitsandbytes" if base.quantization == "nf4" and stored is None else None,
        trust_remote_code=base.trust_remote_code, max_model_len=max_model_len,
        tensor_parallel_size=options.tensor_parallel_size, pipeline_parallel_size=options.pipeline_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization, enable_prefix_caching=options.enable_prefix_caching,
        enable_chunked_prefill=options.enable_chunked_prefill, max_num_seqs=config.max_batch_size,
        max_num_batched_tokens=options.max_num_batched_tokens or None,
        long_prefill_token_threshold=options.long_prefill_token_threshold,
        enable_lora=True, max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras,
        max_lora_rank=config.max_lora_rank, disable_log_stats=False,
        lora_target_modules=list(config.target_modules) if config.target_modules is not None else None, worker_extension_cls=PROBE,
        # CUDA graphs need a GPU; on a CPU host vLLM runs eagerly anyway.
        enforce_eager=not facts.cuda)


def vllm_sampling(params: SamplingParams):
    """vLLM's sampling for loraserve's, field for field; vLLM returns token ids only, as
    deltas (loraserve detokenizes and applies the stop strings, as the native engine does)."""
    from vllm import SamplingParams as VllmSampling
    from vllm.sampling_params import RequestOutputKind

    return VllmSampling(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k, repetition_penalty=params.repetition_penalty, seed=params.seed,
                        ignore_eos=params.ignore_eos, detokenize=False, skip_special_tokens=False,
                        output_kind=RequestOutputKind.DELTA)
