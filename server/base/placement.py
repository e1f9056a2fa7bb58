"""Where the base's weights go: the device_map handed to `from_pretrained`.

accelerate's own "auto" balances every model over every visible GPU, which for a model that fits
on one is a naive pipeline with one GPU busy at a time and activations copied between them. So
`auto` here means: the CPU without a GPU; one device per process in a distributed training run
(`accelerate launch` / torchrun set LOCAL_RANK and WORLD_SIZE; a 4-bit model spread over devices
cannot be trained in distributed mode); one GPU when the estimated weights fit on it with room to
spare for the KV cache and activations; balanced over the visible GPUs otherwise. Any other value
is accelerate's own device_map string ("balanced", "sequential", "cpu", "cuda:1"), used as given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import ConfigError

ONE_GPU_SHARE = 0.8
"""The most of one GPU's free memory the weights may take and still be put on a single GPU: the
rest is left to the KV cache, activations and the CUDA context (the native engine sizes its KV
from what is free after loading)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """The device_map to load with and why, for the log and GetServerInfo."""

    device_map: str | dict
    reason: str


def distributed_local_rank(environ: dict[str, str] | None = None) -> int | None:
    """This process's local rank in a distributed launch (WORLD_SIZE > 1), else None."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    return None


def estimate_weight_bytes(model_dir: Path, quantization: str, dtype: str) -> int | None:
    """The most memory the base's weights take while loading, from its config.json alone (see
    loraserve.base.memory_plan); None when the config cannot be sized there. Routed MoE experts
    count at the compute dtype even with 4-bit quantization: transformers loads them whole
    before loraserve quantizes them per expert, so that is the peak a single GPU must hold."""
    from loraserve.base.memory_plan import DTYPE_BYTES, model_shapes, weight_parts

    try:
        shapes = model_shapes(model_dir)
        parts = weight_parts(shapes, shapes.stored_quantization or quantization, dtype, 0, 0)
    except (ConfigError, OSError, ImportError) as exc:  # an unsized config only means balanced placement
        log.info("placement: cannot size %s from its config (%s); balancing over the GPUs", model_dir.name, exc)
        return None
    peak = {part.name: part.bytes for part in parts}
    if "routed experts" in peak and shapes.stored_quantization is None:
        peak["routed experts"] = sum(e * o * i for e, o, i in shapes.experts) * DTYPE_BYTES[dtype]
    return sum(peak.values())


def choose_placement(requested: str, weight_bytes: int | None, gpu_free_bytes: list[int],
                     local_rank: int | None) -> Placement:
    """The device_map for `requested` (see the module docstring); `gpu_free_bytes` holds each
    visible GPU's free memory, `local_rank` this process's rank in a distributed training run."""
    if requested != "auto":
        return Placement(requested, "set by device_map")
    if not gpu_free_bytes:
        return Placement("cpu", "no GPU visible")
    if local_rank is not None:
        return Placement({"": local_rank}, f"distributed run: this process's own GPU (local rank {local_rank})")
    if len(gpu_free_bytes) == 1:
        return Placement({"": 0}, "the only visible GPU")
    gib = 1024**3
    if weight_bytes is not None and weight_bytes <= ONE_GPU_SHARE * gpu_free_bytes[0]:
        return Placement({"": 0}, f"fits on one GPU (~{weight_bytes / gib:.1f} GiB of weights, "
                                  f"{gpu_free_bytes[0] / gib:.1f} GiB free on GPU 0)")
    size = "size unknown" if weight_bytes is None else f"~{weight_bytes / gib:.1f} GiB of weights"
    return Placement("balanced", f"balanced over {len(gpu_free_bytes)} GPUs ({size})")


def visible_gpu_free_bytes() -> list[int]:
    """Free memory of each visible CUDA device, in bytes (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
