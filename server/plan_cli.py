"""`loraserve plan`: the memory a base needs and whether and how it fits, from config.json alone
(see loraserve.base.memory_plan); flags here, numbers there."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraserve.base.memory_plan import DTYPE_BYTES, GIB, MemoryPlan, model_shapes, plan_memory
from loraserve.config import QUANTIZATIONS, BaseModelConfig, EngineConfig
from loraserve.errors import ConfigError

_DEFAULTS = EngineConfig(base=BaseModelConfig(model="-"))


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `plan` subcommand and its flags (defaults: the server's own); the caller sets its handler."""
    p = sub.add_parser("plan", help="memory per part of a base, KV tokens and placement on N GPUs (config.json only)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory or hub id (only its config.json is read or fetched)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="default: nf4, or the checkpoint's own for a pre-quantized one")
    p.add_argument("--engine", choices=("native", "vllm"), default="native", help="vllm: tensor parallel, MLA latent KV")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16", help="compute dtype on the GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs to place the base on")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of each GPU (GiB)")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="share of each GPU kept for activations and the CUDA context")
    p.add_argument("--max-loras", type=int, default=_DEFAULTS.max_loras, help="adapter slots on the accelerator")
    p.add_argument("--max-lora-rank", type=int, default=_DEFAULTS.max_lora_rank, help="slot buffers are padded to it")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def _check_quantization(model: str, requested: str | None, stored: str | None, engine: str) -> None:
    """Refuse what the server would refuse: re-quantizing a pre-quantized checkpoint (the server's
    own rule, loraserve.base.quantization), and fp4/int8 on the vLLM engine."""
    if requested is None:
        return
    if stored is not None and engine == "vllm":
        from loraserve.base.quantization import refuse_requantization

        refuse_requantization(model, requested, stored, "vLLM serves it as it comes: use --quantization none")
    elif stored is not None:
        import torch

        from loraserve.base.quantization import load_quantization

        load_quantization(BaseModelConfig(model=model, quantization=requested), "", stored, torch.bfloat16)
    if engine == "vllm" and requested in ("fp4", "int8"):
        raise ConfigError(f"the vLLM engine quantizes at load with bitsandbytes NF4 only, not {requested}; "
                          "use --quantization nf4 or none")


def _config_dir(model: str) -> Path:
    """A local directory as the server resolves it; for a hub id, only its config.json is fetched
    (the server's resolve_model_dir would fetch the weights too)."""
    from loraserve.base.loading import resolve_model_dir

    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return resolve_model_dir(model)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, "config.json")).parent
    except Exception as exc:  # offline, unknown repo, gated: all one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model {model!r} is not a local directory and its config.json cannot be fetched "
                          f"from the hub: {first}") from exc


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for `args` (see add_parser); a bad model or flag is a ConfigError."""
    if args.max_loras < 1 or args.max_lora_rank < 1:
        raise ConfigError(f"--max-loras and --max-lora-rank must be positive, got {args.max_loras}, {args.max_lora_rank}")
    model_dir = _config_dir(args.model)
    shapes = model_shapes(model_dir)
    _check_quantization(args.model, args.quantization, shapes.stored_quantization, args.engine)
    quantization = None if args.quantization == "none" and shapes.stored_quantization else args.quantization
    plan = plan_memory(shapes, quantization, args.engine, args.dtype, args.gpus, args.gpu_memory, args.reserve,
                       args.max_loras, args.max_lora_rank,
                       _DEFAULTS.max_input_tokens + _DEFAULTS.max_new_tokens_limit)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as an aligned table (GiB with 2 decimals) and a few lines on the fit."""
    base, lora = plan.parts[:-1], plan.parts[-1]
    rows = [(p.name, f"{p.params:,}", _gib(p.bytes), p.storage) for p in base]
    rows.append(("base weights", f"{sum(p.params for p in base):,}", _gib(plan.weights_bytes), ""))
    rows.append((lora.name, f"{lora.params:,}", _gib(lora.bytes), lora.storage))
    rows.append(("total", f"{sum(p.params for p in plan.parts):,}", _gib(plan.total_bytes), ""))
    head = ("part", "params", "GiB", "storage")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]

    def line(r: tuple[str, ...]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()

    rule = "-" * (sum(widths) + 6)
    out = [f"{plan.model} ({plan.model_type}), quantization {plan.quantization}, engine {plan.engine}, "
           f"compute dtype {plan.dtype}", "", line(head), *(line(r) for r in rows[:-3]), rule,
           line(rows[-3]), line(rows[-2]), rule, line(rows[-1]), ""]
    kv = ", ".join(f"{k} {v:,} B ({v / 1024:.1f} KiB)" + (" [used]" if k == plan.kv_layout else "")
                   for k, v in plan.kv_cache.items())
    out.append(f"KV cache per token: {kv}")
    out.append(f"GPUs: {plan.gpus} x {plan.gpu_memory_gib:g} GiB, {plan.reserve:.0%} reserved: "
               f"{_gib(plan.usable_bytes_per_gpu)} GiB usable each")
    out.append(f"placement: {plan.placement}")
    out.append(f"KV tokens that fit: {plan.kv_tokens:,} (at least {plan.min_kv_tokens:,} needed: one longest request)")
    out += [f"note: {n}" for n in plan.notes]
    if plan.suggestions:
        out.append("would fit: " + "; or ".join(plan.suggestions))
    return "\n".join(out)
