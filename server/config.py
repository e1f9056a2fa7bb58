"""The engine's validated settings: one object per process, built from flags in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import ConfigError

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
ARCHS = ("deepseek-v3", "deepseek-v2", "deepseek-llm")
"""Architectures `init-model` builds (here, not in loraserve.devtools.synthetic_base, so the CLI can list
them without importing torch)."""
SIZES = ("tiny", "small")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class BaseModelConfig:
    """Which base to load and how; shared by the server and the trainer so an adapter trained
    on a base is served on the identical base."""

    model: str
    """A local model directory or a hub id (e.g. deepseek-ai/deepseek-llm-7b-chat)."""
    quantization: str = "nf4"
    """nf4 | fp4 | int8 | none, through bitsandbytes (NF4 + double quantization as in QLoRA)."""
    dtype: str = "auto"
    """Compute dtype: auto = bfloat16 on CUDA, float32 on CPU."""
    device_map: str = "auto"
    """auto = one GPU when the weights fit on one, else balanced over the visible GPUs (one per
    process in a distributed training run; the CPU without a GPU); or any accelerate device_map
    string, used as given (see loraserve.base.placement)."""
    trust_remote_code: bool = False
    """Never on by default: remote code in a checkpoint would run inside the server."""

    @property
    def public_name(self) -> str:
        """How the base is named outside the server (GetServerInfo, metrics labels): a local
        directory by its last component, never its path; a hub id as it is."""
        return Path(self.model).name if Path(self.model).expanduser().is_dir() else self.model

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must name a model directory or hub id")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if not self.device_map:
            raise ConfigError("device_map must be auto or an accelerate device_map (balanced, sequential, cpu, cuda:1)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of the multi-LoRA engine."""

    base: BaseModelConfig
    max_loras: int = 4
    """Adapter slots on the accelerator: the most distinct adapters in one running batch."""
    max_cpu_loras: int = 16
    """Adapters kept decoded in host memory (LRU) behind the slots, at most."""
    host_cache_bytes: int = 0
    """Host memory for those decoded adapters, at most (0 = auto: an eighth of the host's RAM)."""
    max_lora_rank: int = 64
    """Highest adapter rank accepted; slot buffers are padded to it."""
    max_batch_size: int = 32
    """Most sequences decoding together."""
    max_queue: int = 256
    """Most requests waiting for a place in the batch; beyond it submissions are refused."""
    max_input_tokens: int = 4096
    """Longest prompt accepted, in tokens."""
    max_new_tokens_limit: int = 2048
    """Largest max_new_tokens a request may ask for."""
    max_prefill_tokens: int = 0
    """Prompt tokens prefilled per engine step (padded), between two decode steps: a longer
    prompt is prefilled in chunks over several steps, so running sequences never stall for a
    whole long prefill. 0 = auto (512 with CUDA, 64 on a CPU)."""
    kv_cache_bytes: int = 0
    """Memory every sequence's KV may take together, each reserving its prompt + max_new_tokens
    when admitted; a request that would not fit waits, one that can never fit is
    RESOURCE_EXHAUSTED (0 = auto: 60% of the free accelerator memory after load, or a quarter of
    the host's available RAM on a CPU)."""
    prefix_cache_bytes: int = 256 << 20
    """Host or accelerator memory for the KV of prompt prefixes, reused per adapter version
    (0 = off)."""
    max_slot_wait_steps: int = 64
    """Decode steps the oldest request may wait for an adapter slot before newer requests stop
    overtaking it (starvation guard)."""
    target_modules: tuple[str, ...] | None = None
    """Module names (last path component) that get LoRA slots; None = every supported linear."""

    def __post_init__(self) -> None:
        positive = ("max_loras", "max_cpu_loras", "max_lora_rank", "max_batch_size", "max_queue",
                    "max_input_tokens", "max_new_tokens_limit", "max_slot_wait_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras}): "
                "every adapter in a slot is also held in host memory")
        if not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 0:
            raise ConfigError(f"kv_cache_bytes must be an integer >= 0 (0 = auto), got {self.kv_cache_bytes!r}")
        if not isinstance(self.host_cache_bytes, int) or self.host_cache_bytes < 0:
            raise ConfigError(f"host_cache_bytes must be an integer >= 0 (0 = auto), got {self.host_cache_bytes!r}")
        if not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise ConfigError(f"prefix_cache_bytes must be an integer >= 0 (0 = off), got {self.prefix_cache_bytes!r}")
        if not isinstance(self.max_prefill_tokens, int) or self.max_prefill_tokens < 0:
            raise ConfigError(f"max_prefill_tokens must be an integer >= 0 (0 = auto), got {self.max_prefill_tokens!r}")
