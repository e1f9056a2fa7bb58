"""Tiny, real DeepSeek-architecture checkpoints built locally, for tests and benchmarks.

`init_model` writes an ordinary Hugging Face model directory (config.json, safetensors weights,
generation_config.json, tokenizer files, chat template) that `AutoModelForCausalLM` and
`AutoTokenizer` load exactly as they would a downloaded DeepSeek checkpoint: same model
classes, same module and weight names, same special tokens and chat format. Only the sizes are
shrunk and the weights random, so serving and training code can be exercised with no hub.

Parameter counts (fp32, untied lm_head), with the vocabulary the tokenizer actually reaches —
512 for `tiny`; for `small` the embedded corpus runs out of merges at 1549 (v3, two extra role
tokens) or 1547, short of the 4096 target:

    arch           tiny       small
    deepseek-v3    159,424    24,497,664   (6 layers: 1 dense + 5 MoE, 8 experts top-2)
    deepseek-v2    167,552    26,706,816   (6 layers: 1 dense + 5 MoE, 8 experts top-2)
    deepseek-llm   160,064    22,431,360   (12 dense layers)
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GenerationConfig,
    LlamaConfig,
    PreTrainedConfig,
)

from loraserve.config import ARCHS, SIZES  # noqa: E402  (re-exported: the CLI lists them without torch)
from loraserve.devtools.synthetic_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, build_tokenizer

# A prompt plus generation comfortably fits; real DeepSeek configs say 4096 before RoPE scaling.
MAX_POSITION_EMBEDDINGS = 4096


@dataclass(frozen=True)
class ModelShape:
    """The dimensions one size shares across archs; each arch uses the fields it has."""

    vocab_target: int  # BPE training target; the model vocab is what the tokenizer reaches
    hidden_size: int
    num_hidden_layers: int  # v2/v3
    dense_num_hidden_layers: int  # deepseek-llm: no experts, so deeper to reach the same budget
    num_attention_heads: int
    intermediate_size: int  # dense MLP (llm: every layer; v2/v3: layer 0)
    moe_intermediate_size: int  # one routed or shared expert
    n_routed_experts: int
    num_experts_per_tok: int
    q_lora_rank: int  # v3 only; v2-Lite has a plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    llm_head_dim: int
    """deepseek-llm: width of one attention head (heads = hidden_size / it, as in deepseek-llm-7b's
    4096 / 128). At least 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... only."""


# Every linear's in_features is a multiple of 64 and out_features of 32: bitsandbytes' CPU
# NF4 kernel repacks weights in 64-wide quantization blocks and 32-row tiles and fails on
# anything else (real DeepSeek shapes all qualify; kv_a_proj_with_mqa's output is
# kv_lora_rank + qk_rope_head_dim, hence the rope dims of 32).
SHAPES: dict[str, ModelShape] = {
    # Two layers so there is exactly one dense (layer 0) and one MoE layer (layer 1).
    "tiny": ModelShape(
        vocab_target=512,
        hidden_size=64,
        num_hidden_layers=2,
        dense_num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=16,
        qk_rope_head_dim=32,
        v_head_dim=16,
        llm_head_dim=32,
    ),
    "small": ModelShape(
        vocab_target=4096,
        hidden_size=384,
        num_hidden_layers=6,
        dense_num_hidden_layers=12,
        num_attention_heads=8,
        intermediate_size=1024,
        moe_intermediate_size=384,
        n_routed_experts=8,
        num_experts_per_tok=2,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        llm_head_dim=64,
    ),
}


def _check_arch_and_size(arch: str, size: str) -> None:
    """Reject names this module cannot build, listing the ones it can."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


REAL_MLA = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
"""The MLA dimensions of every DeepSeek-V2/V3/R1 checkpoint (vLLM's MLA kernels take no others)."""


def synthetic_config(arch: str, size: str, vocab_size: int, real_mla: bool = False,
                     special_ids: tuple[int, int, int] = (BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID)) -> PreTrainedConfig:
    """Return the transformers config for a shrunk `arch` checkpoint of `size`.

    `vocab_size` should be `len(tokenizer)` so every id the model can emit decodes;
    `special_ids` are its (BOS, EOS, PAD) ids. `real_mla`: V2/V3 attention at DeepSeek's own MLA
    dimensions (`REAL_MLA`) at the size's width, instead of the size's shrunk ones.
    """
    _check_arch_and_size(arch, size)
    if real_mla and arch == "deepseek-llm":
        raise ValueError("real MLA dimensions apply to deepseek-v2 and deepseek-v3 (deepseek-llm has no MLA)")
    s = SHAPES[size]
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_attention_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        # Real V2/V3 use YaRN scaling to reach 128k+; plain RoPE keeps tiny models simple and
        # exercises the same weights and module names.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=special_ids[0],
        eos_token_id=special_ids[1],
        pad_token_id=special_ids[2],
        dtype="float32",
    )
    mla_moe: dict[str, Any] = dict(
        kv_lora_rank=s.kv_lora_rank,
        qk_nope_head_dim=s.qk_nope_head_dim,
        qk_rope_head_dim=s.qk_rope_head_dim,
        v_head_dim=s.v_head_dim,
        moe_intermediate_size=s.moe_intermediate_size,
        n_routed_experts=s.n_routed_experts,
        num_experts_per_tok=s.num_experts_per_tok,
        first_k_dense_replace=1,
        moe_layer_freq=1,
    )
    if real_mla:
        mla_moe.update(REAL_MLA)
    if arch == "deepseek-v3":
        return DeepseekV3Config(
            **common,
            **mla_moe,
            q_lora_rank=s.q_lora_rank,
            n_shared_experts=1,
            # One group: group-limited routing reduces to plain sigmoid top-k.
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            # As the real config.json says (vLLM reads them; transformers' V3 implies them).
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            # No multi-token-prediction weights are written, so do not advertise any.
            num_mtp_layers=0,
        )
    if arch == "deepseek-v2":
        # As DeepSeek-V2-Lite: no query compression, two shared experts, greedy softmax top-k.
        return DeepseekV2Config(
            **common,
            **mla_moe,
            q_lora_rank=None,
            n_shared_experts=2,
            topk_method="greedy",
            scoring_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        )
    # deepseek-llm-7b is a plain Llama: multi-head attention, SwiGLU MLP.
    common["num_hidden_layers"] = s.dense_num_hidden_layers
    common["num_attention_heads"] = common["num_key_value_heads"] = s.hidden_size // s.llm_head_dim
    return LlamaConfig(**common, head_dim=s.llm_head_dim, attention_bias=False, mlp_bias=False)


def _check_empty_target(out: Path) -> None:
    """Refuse to write over anything: a checkpoint directory is written once, whole."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"refusing to write a model to {out}: it exists and is not an empty directory")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def init_model(out_dir: str | Path, arch: str, size: str = "tiny", seed: int = 0, *, real_mla: bool = False,
               tokenizer_dir: str | Path | None = None) -> Path:
    """Build a random `arch` model of `size` with its tokenizer and write it to `out_dir`.

    `tokenizer_dir`: a real tokenizer's files (a DeepSeek checkpoint's tokenizer.json and
    tokenizer_config.json) copied as they are, the model's vocabulary and special ids sized to
    it, instead of the embedded one. `real_mla`: see `synthetic_config`.

    The same arguments always produce byte-identical weight files. The directory is
    built beside `out_dir` and renamed into place, so readers never see a half-written model.
    Raises ValueError if `out_dir` exists and is not empty. Returns `out_dir` as a Path.
    """
    _check_arch_and_size(arch, size)
    out = Path(out_dir)
    _check_empty_target(out)

    if tokenizer_dir is None:
        tokenizer = build_tokenizer(arch, SHAPES[size].vocab_target)
        tokenizer.model_max_length = MAX_POSITION_EMBEDDINGS  # the checkpoint agrees with itself
    else:
        tokenizer = _real_tokenizer(Path(tokenizer_dir))
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config = synthetic_config(arch, size, len(tokenizer), real_mla=real_mla, special_ids=special)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # A trained model's logits are confident; with the default 0.02 init the head behind
        # the final RMSNorm caps every logit near 1, so no adapter could ever make a
        # prediction confident (training would plateau near log(vocab)). A head scaled to
        # 1/sqrt(hidden) gives logits of unit scale, like a real checkpoint's.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, config.hidden_size ** -0.5)
    # Greedy by default so a random model's output is reproducible. (DeepSeek's own checkpoints
    # ship do_sample with temperature 0.6 / top_p 0.95 here.)
    model.generation_config = GenerationConfig(bos_token_id=special[0], eos_token_id=special[1],
                                               pad_token_id=special[2])

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would survive the rename and hide the model
        # save_original_format: un-fuse the in-memory 3D expert tensors back into DeepSeek's
        # per-expert `mlp.experts.{i}.{gate,up,down}_proj.weight` keys (also the default).
        model.save_pretrained(staging, save_original_format=True)
        if tokenizer_dir is None:
            tokenizer.save_pretrained(staging)
        else:  # the files as the real checkpoint has them
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy(Path(tokenizer_dir) / name, staging / name)
        _check_empty_target(out)  # something may have appeared while we were building
        if out.exists():
            out.rmdir()  # empty: rename cannot replace a directory on every platform
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _real_tokenizer(tokenizer_dir: Path):
    from loraserve.base.tokenizer import load_tokenizer

    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "tokenizer.model").is_file():
        raise ValueError(f"{tokenizer_dir} holds no tokenizer (tokenizer.json or tokenizer.model)")
    tokenizer = load_tokenizer(tokenizer_dir)  # as the server and the trainer will load it
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has no BOS or EOS token")
    return tokenizer
