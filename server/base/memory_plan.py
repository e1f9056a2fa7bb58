"""How much accelerator memory a base needs to be served, from its config.json alone: weights per
part after quantization, the LoRA slot buffers, the KV cache per token, and whether and how
that fits on a given set of GPUs (`loraserve plan`).

The shapes come from the model transformers itself builds on the meta device (no weights are
read), so they are the ones the server loads; the bytes per part follow the storage formats:

    bitsandbytes 4-bit (nf4/fp4, double quant as the server loads it), per weight of n params:
        ceil(n/2) codes + ceil(n/64) uint8 absmax + ceil(n/64/256) fp32 absmax2
        + 256 fp32 nested code + 16 fp32 code + one fp32 offset
    bitsandbytes int8 (LLM.int8): n int8 + one fp32 scale per output row
    fp8 checkpoint (DeepSeek-V3, block 128x128): n fp8 + one fp32 weight_scale_inv per block
    none: n x compute dtype bytes

What bitsandbytes leaves at the compute dtype (embeddings, lm_head, norms, router gates) is
counted at the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraserve.base.placement import ONE_GPU_SHARE, choose_placement
from loraserve.errors import ConfigError

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FOUR_BIT = ("nf4", "fp4")
BNB_BLOCK, BNB_NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit blocksize and double-quant blocksize
FP8_BLOCK = 128


@dataclass(frozen=True)
class ModelShapes:
    """What the memory of a base depends on, read off its meta-device model and config."""

    name: str
    model_type: str
    linears: list[tuple[int, int]]
    """(out, in) of every nn.Linear in the decoder layers bitsandbytes replaces."""
    lora_targets: list[tuple[int, int]]
    """(out, in) of the linears that get LoRA slots by default (attention, dense MLP, shared experts)."""
    experts: list[tuple[int, int, int]]
    """(experts, out, in) of each fused routed-expert Parameter (gate_up_proj, down_proj)."""
    embedding_params: int
    """Token embeddings and the output head (lm_head)."""
    other_params: int
    """Norms, router gates, biases: kept at the compute dtype."""
    kv_expanded_per_token: int
    """Elements of K and V per token, all layers: what a cache of per-head keys/values holds."""
    kv_latent_per_token: int | None
    """Elements per token of an MLA latent cache (kv_lora_rank + qk_rope_head_dim per layer)."""
    kv_heads: int
    stored_quantization: str | None


def _weight_bytes(out_f: int, in_f: int, kind: str, compute_bytes: int) -> int:
    """Bytes one (out_f, in_f) weight takes stored as `kind` (see the module docstring)."""
    n = out_f * in_f
    if kind in FOUR_BIT:
        blocks = math.ceil(n / BNB_BLOCK)
        return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 4 * (256 + 16 + 1)
    if kind == "int8":
        return n + 4 * out_f
    if kind == "fp8":
        return n + 4 * math.ceil(out_f / FP8_BLOCK) * math.ceil(in_f / FP8_BLOCK)
    return n * compute_bytes


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def model_shapes(model_dir: Path) -> ModelShapes:
    """Build the base in `model_dir` on the meta device (config.json only) and collect its shapes."""
    import torch
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraserve.base.quantization import checkpoint_quantization
    from loraserve.lora.wrapping import UNSUPPORTED_MODULES

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model {str(model_dir)!r} has no config.json")
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"model {str(model_dir)!r}: config.json cannot be read by transformers: {_first_line(exc)}") from exc
    stored = checkpoint_quantization(hf_config)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model {str(model_dir)!r} ({hf_config.model_type}) cannot be built as a causal LM: "
                          f"{_first_line(exc)}") from exc
    linears: list[tuple[int, int]] = []
    targets: list[tuple[int, int]] = []
    experts: list[tuple[int, int, int]] = []
    embedding = other = 0
    for name, param in model.named_parameters():
        parent_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent_name)
        parts = parent_name.split(".")
        if param.dim() == 3:  # fused routed experts: [experts, out, in]
            experts.append(tuple(param.shape))
        elif isinstance(module, nn.Embedding) or parts[-1] == "lm_head":
            embedding += param.numel()
        elif isinstance(module, nn.Linear) and leaf == "weight" and "layers" in parts and parts[-1] != "gate":
            linears.append((module.out_features, module.in_features))
            if not any(p in UNSUPPORTED_MODULES for p in parts):
                targets.append((module.out_features, module.in_features))
        else:
            other += param.numel()
    c = hf_config
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    if getattr(c, "kv_lora_rank", None):  # MLA: K = nope + rope per head, V = v_head_dim per head
        expanded = layers * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
        latent = layers * (c.kv_lora_rank + c.qk_rope_head_dim)
        kv_heads = heads
    else:
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        expanded, latent = 2 * layers * kv_heads * head_dim, None
    return ModelShapes(model_dir.name, c.model_type, linears, targets, experts, embedding, other,
                       expanded, latent, kv_heads, stored)


@dataclass(frozen=True)
class Part:
    """One line of the plan: a part of the memory, its parameter count, bytes and storage."""

    name: str
    params: int
    bytes: int
    storage: str


@dataclass
class MemoryPlan:
    """The plan `loraserve plan` prints; `as_dict` is its --json form."""

    model: str
    model_type: str
    engine: str
    quantization: str
    dtype: str
    parts: list[Part]
    """The base's parts, then the LoRA slot buffers (last)."""
    weights_bytes: int
    """The base's weights, every part but the LoRA slots."""
    total_bytes: int
    kv_cache: dict[str, int]
    """Bytes per token by cache layout (llama; MLA: expanded and latent)."""
    kv_layout: str
    """The layout the chosen engine uses."""
    gpus: int
    gpu_memory_gib: float
    reserve: float
    usable_bytes_per_gpu: int
    fits: bool
    placement: str
    kv_tokens: int
    """Tokens of KV that fit beside the weights (all GPUs together for balanced placement)."""
    min_kv_tokens: int
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _kind(requested: str | None, stored: str | None) -> str:
    """The storage kind of the quantized weights: the checkpoint's own or the requested one."""
    if stored is not None:
        return stored
    return requested or "nf4"


def weight_parts(shapes: ModelShapes, kind: str, dtype: str, max_loras: int, max_lora_rank: int) -> list[Part]:
    """The memory of each part of the base, plus the LoRA slot buffers, stored as `kind`."""
    cb = DTYPE_BYTES[dtype]
    if kind not in (*FOUR_BIT, "int8", "fp8", "none"):
        raise ConfigError(f"plan cannot size weights stored as {kind!r}: only bitsandbytes (nf4, fp4, int8), "
                          "fp8 block-quantized and unquantized bases")
    label = {"nf4": "nf4 + double-quant absmax", "fp4": "fp4 + double-quant absmax", "int8": "int8 + fp32 row scales",
             "fp8": "fp8 + fp32 scale per 128x128 block", "none": dtype}[kind]
    parts = [Part("quantized linears" if kind != "none" else "linears", sum(o * i for o, i in shapes.linears),
                  sum(_weight_bytes(o, i, kind, cb) for o, i in shapes.linears), label)]
    if shapes.experts:
        # int8 (bitsandbytes) has no per-expert path for fused 3-D experts: they stay at the compute dtype.
        expert_kind = "none" if kind == "int8" else kind
        note = (f"{dtype} (int8 does not quantize fused experts)" if kind == "int8"
                else f"{label}, per expert" if kind != "none" else dtype)
        # The 4-bit code tables (16 + 256 fp32) are shared by a matrix's experts (moe_experts.py).
        shared = 4 * (256 + 16) if expert_kind in FOUR_BIT else 0
        parts.append(Part("routed experts", sum(e * o * i for e, o, i in shapes.experts),
                          sum(e * (_weight_bytes(o, i, expert_kind, cb) - shared) + shared
                              for e, o, i in shapes.experts), note))
    parts.append(Part("embeddings + lm_head", shapes.embedding_params, shapes.embedding_params * cb, dtype))
    parts.append(Part("norms, router gates", shapes.other_params, shapes.other_params * cb, dtype))
    lora = max_loras * max_lora_rank * sum(o + i for o, i in shapes.lora_targets)
    parts.append(Part(f"LoRA slots ({max_loras} x r{max_lora_rank})", lora, lora * cb,
                      f"{dtype}, {len(shapes.lora_targets)} linears"))
    return parts


def _kv_per_gpu_token(kv_token: int, layout: str, kv_heads: int, tensor_parallel: int) -> int:
    """KV bytes per token on each GPU: tensor parallel splits per-head KV over the ranks (heads
    replicated past their count); an MLA latent has no heads and is replicated on every rank."""
    return kv_token if layout == "latent" else kv_token // math.gcd(tensor_parallel, kv_heads)


def _fewest_gpus(total: int, kv_token: int, layout: str, kv_heads: int, min_tokens: int, usable: int,
                 tensor_parallel: bool) -> int | None:
    """Fewest GPUs (a power of two up to 64) of `usable` bytes each holding `total` bytes of
    weights and `min_tokens` of KV: split evenly (balanced or tensor parallel)."""
    for n in (1, 2, 4, 8, 16, 32, 64):
        if tensor_parallel:
            if total / n + min_tokens * _kv_per_gpu_token(kv_token, layout, kv_heads, n) <= usable:
                return n
        elif total + min_tokens * kv_token <= n * usable:
            return n
    return None


def plan_memory(shapes: ModelShapes, quantization: str | None = None, engine: str = "native",
                dtype: str = "bfloat16", gpus: int = 1, gpu_memory_gib: float = 80.0, reserve: float = 0.1,
                max_loras: int = 4, max_lora_rank: int = 64, min_kv_tokens: int = 6144) -> MemoryPlan:
    """The plan for serving `shapes` on `gpus` GPUs of `gpu_memory_gib` each with `reserve` of each
    kept for activations and the CUDA context; fits when the weights and `min_kv_tokens` of KV fit."""
    if gpus < 1 or gpu_memory_gib <= 0 or not 0 <= reserve < 1:
        raise ConfigError(f"need gpus >= 1, gpu_memory > 0 and 0 <= reserve < 1, got {gpus}, {gpu_memory_gib}, {reserve}")
    kind = _kind(quantization, shapes.stored_quantization)
    notes: list[str] = []
    if shapes.stored_quantization is not None:
        notes.append(f"pre-quantized checkpoint: weights as stored ({shapes.stored_quantization}, from config.json)")
    if shapes.experts and kind in FOUR_BIT:
        notes.append(f"routed experts counted in {kind} per expert (the native engine's per-expert quantization)")
    if shapes.experts and kind == "int8":
        notes.append(f"routed experts counted at {dtype}: int8 does not quantize fused 3-D experts")
    cb = DTYPE_BYTES[dtype]
    parts = weight_parts(shapes, kind, dtype, max_loras, max_lora_rank)
    total = sum(p.bytes for p in parts)
    if shapes.experts and engine == "native":
        per_adapter = max_lora_rank * sum(e * (o + i) for e, o, i in shapes.experts) * cb
        notes.append(f"routed-expert LoRA: not in the slots; {per_adapter / GIB:.2f} GiB per adapter loaded "
                     f"into a slot at r{max_lora_rank} on gate_up_proj and down_proj (allocated on load)")
    kv = {"expanded": shapes.kv_expanded_per_token * cb}
    if shapes.kv_latent_per_token is not None:
        kv["latent"] = shapes.kv_latent_per_token * cb
        # Both engines cache MLA's latent (transformers 5 keeps compressed_kv + k_pe per token,
        # and the native engine's absorbed decode attends over it without expanding it).
        layout = "latent"
        notes.append("KV: MLA latent (kv_lora_rank + rope per layer), as both engines cache it")
    else:
        layout = "expanded"
    kv_token = kv[layout]
    usable = int(gpu_memory_gib * GIB * (1 - reserve))
    lora_bytes = parts[-1].bytes
    if engine == "vllm":
        room = usable - total / gpus
        tokens = max(0, int(room // _kv_per_gpu_token(kv_token, layout, shapes.kv_heads, gpus)))
        placement = f"vLLM tensor parallel over {gpus} GPU{'s' if gpus > 1 else ''}"
    else:  # the server's own choice (loraserve.base.placement) on GPUs with all their memory free
        chosen = choose_placement("auto", total - lora_bytes, [int(gpu_memory_gib * GIB)] * gpus, None)
        one_gpu = chosen.device_map == {"": 0}
        tokens = max(0, int(((usable if one_gpu else gpus * usable) - total) // kv_token))
        placement = "one GPU" if one_gpu else f"balanced over {gpus} GPUs"
        if one_gpu and gpus > 1:
            placement += f" (weights under {ONE_GPU_SHARE:.0%} of one)"
    fits = tokens >= min_kv_tokens
    suggestions: list[str] = []
    if not fits:
        tp = engine == "vllm"
        n = _fewest_gpus(total, kv_token, layout, shapes.kv_heads, min_kv_tokens, usable, tp)
        if n is not None and n > gpus:
            suggestions.append(f"--gpus {n} (of {gpu_memory_gib:g} GiB)")
        if kind not in FOUR_BIT and shapes.stored_quantization is None:
            nf4 = sum(p.bytes for p in weight_parts(shapes, "nf4", dtype, max_loras, max_lora_rank))
            suggestions.append(f"--quantization nf4 ({nf4 / GIB:.2f} GiB with the LoRA slots)")
        if not tp and kind not in ("fp4", "int8"):
            vllm_layout = "latent" if "latent" in kv else "expanded"
            m = _fewest_gpus(total, kv[vllm_layout], vllm_layout, shapes.kv_heads, min_kv_tokens, usable, True)
            if m is not None:
                suggestions.append(f"--engine vllm --gpus {m} (tensor parallel)")
    described = kind if shapes.stored_quantization is None else f"{kind} (checkpoint)"
    return MemoryPlan(shapes.name, shapes.model_type, engine, described, dtype, parts, total - lora_bytes, total,
                      kv, layout, gpus, gpu_memory_gib, reserve, usable, fits, placement if fits else "does not fit",
                      tokens, min_kv_tokens, notes, suggestions)
