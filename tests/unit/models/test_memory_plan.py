"""`loraserve plan` on the published configs of deepseek-llm-7b-base, DeepSeek-V2-Lite and
DeepSeek-V3: parameter counts and bytes against counts made by hand from the config values,
the fit decisions and placements, the --json form and the errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.base.memory_plan import model_shapes, plan_memory
from loraserve.cli import main

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "real_configs"
GB, GIB = 1e9, 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes + uint8 absmax + fp32 absmax2 per 256 blocks
FP8_BYTES = 1 + 4 / (128 * 128)  # codes + fp32 scale per 128x128 block


def _model_dir(tmp_path: Path, name: str, drop_quantization: bool = False) -> Path:
    """A model directory holding only the fixture as its config.json."""
    out = tmp_path / name
    out.mkdir()
    config = json.loads((FIXTURES / f"{name}.json").read_text())
    if drop_quantization:  # as a bf16 conversion of the FP8 checkpoint would have it
        config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


def _hand_counts(c: dict) -> dict[str, int]:
    """Parameters per part and LoRA (in + out) sums, counted from the config values alone."""
    h, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    if "kv_lora_rank" in c:
        qk, v, rank, rope = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"], c["qk_rope_head_dim"]
        q = [(heads * qk, h)] if c["q_lora_rank"] is None else [(c["q_lora_rank"], h), (heads * qk, c["q_lora_rank"])]
        attn = [*q, (rank + rope, h), (heads * (qk - rope + v), rank), (h, heads * v)]
        norms_per_layer = 2 * h + rank + (c["q_lora_rank"] or 0)
        dense_layers = c["first_k_dense_replace"]
    else:
        head_dim = h // heads
        kv = c["num_key_value_heads"] * head_dim
        attn = [(heads * head_dim, h), (kv, h), (kv, h), (h, heads * head_dim)]
        norms_per_layer, dense_layers = 2 * h, layers
    moe_layers = layers - dense_layers
    dense = [(c["intermediate_size"], h)] * 2 + [(h, c["intermediate_size"])]
    shared = [(c.get("n_shared_experts", 0) * c.get("moe_intermediate_size", 0), h)] * 2 + \
             [(h, c.get("n_shared_experts", 0) * c.get("moe_intermediate_size", 0))]
    linears = layers * attn + dense_layers * dense + (moe_layers * shared if moe_layers else [])
    experts = moe_layers * c.get("n_routed_experts", 0) * 3 * h * c.get("moe_intermediate_size", 0)
    return {
        "linears": sum(o * i for o, i in linears),
        "lora_in_out": sum(o + i for o, i in linears),
        "experts": experts,
        "embeddings": 2 * c["vocab_size"] * h,
        "other": layers * norms_per_layer + h + moe_layers * c.get("n_routed_experts", 0) * h,
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("plans")
    found = {name: model_shapes(_model_dir(root, name)) for name in ("deepseek-llm-7b-base", "deepseek-v2-lite",
                                                                     "deepseek-v3")}
    bf16 = tmp_path_factory.mktemp("bf16")
    found["deepseek-v3-bf16"] = model_shapes(_model_dir(bf16, "deepseek-v3", drop_quantization=True))
    return found


@pytest.mark.parametrize("name", ["deepseek-llm-7b-base", "deepseek-v2-lite", "deepseek-v3"])
def test_parameter_counts_and_bytes_match_hand_counts(shapes, name):
    c = json.loads((FIXTURES / f"{name}.json").read_text())
    want = _hand_counts(c)
    plan = plan_memory(shapes[name], None)
    parts = {p.name: p for p in plan.parts}
    linears = parts["quantized linears"]
    assert linears.params == want["linears"]
    assert parts["embeddings + lm_head"].params == want["embeddings"]
    assert parts["norms, router gates"].params == want["other"]
    assert (parts["routed experts"].params if "routed experts" in parts else 0) == want["experts"]
    per_param = FP8_BYTES if name == "deepseek-v3" else NF4_BYTES
    quantized = want["linears"] + want["experts"]
    expected = quantized * per_param + 2 * (want["embeddings"] + want["other"])
    assert plan.weights_bytes == pytest.approx(expected, rel=0.01)
    lora = parts["LoRA slots (4 x r64)"]
    assert lora.bytes == 4 * 64 * want["lora_in_out"] * 2


def test_the_issue_s_sanity_targets(shapes):
    assert plan_memory(shapes["deepseek-llm-7b-base"], "nf4").weights_bytes / GB == pytest.approx(4.8, rel=0.03)
    assert plan_memory(shapes["deepseek-v2-lite"], "nf4").weights_bytes / GB == pytest.approx(8.7, rel=0.03)
    assert plan_memory(shapes["deepseek-v2-lite"], "none").weights_bytes / GB == pytest.approx(31.4, rel=0.03)
    assert plan_memory(shapes["deepseek-v3-bf16"], "nf4").weights_bytes / GB == pytest.approx(349, rel=0.03)
    fp8 = plan_memory(shapes["deepseek-v3"], None).weights_bytes / GB
    assert 671 <= fp8 <= 680


def test_int8_keeps_fused_experts_at_the_compute_dtype(shapes):
    plan = plan_memory(shapes["deepseek-v2-lite"], "int8")
    experts = next(p for p in plan.parts if p.name == "routed experts")
    assert experts.bytes == 2 * experts.params and "int8 does not quantize" in experts.storage


def test_kv_per_token_llama_and_both_mla_layouts(shapes):
    llama = plan_memory(shapes["deepseek-llm-7b-base"], "nf4")
    assert llama.kv_cache == {"expanded": 2 * 30 * 32 * 128 * 2} and llama.kv_layout == "expanded"
    native = plan_memory(shapes["deepseek-v2-lite"], "nf4")
    assert native.kv_cache == {"expanded": 27 * 16 * (128 + 64 + 128) * 2, "latent": 27 * (512 + 64) * 2}
    # transformers 5 caches MLA's latent and the native engine's absorbed decode attends over it.
    assert native.kv_layout == "latent"
    assert plan_memory(shapes["deepseek-v2-lite"], "nf4", engine="vllm").kv_layout == "latent"


def test_fits_and_placements(shapes):
    small = plan_memory(shapes["deepseek-llm-7b-base"], "nf4")
    assert small.fits and small.placement == "one GPU"
    usable = 80 * GIB * 0.9
    assert small.kv_tokens == pytest.approx((usable - small.total_bytes) / small.kv_cache["expanded"], abs=1)
    assert plan_memory(shapes["deepseek-llm-7b-base"], "nf4", gpus=4).placement.startswith("one GPU")

    v3 = plan_memory(shapes["deepseek-v3"], None)
    assert not v3.fits and v3.placement == "does not fit" and v3.kv_tokens == 0
    assert any(s.startswith("--gpus ") for s in v3.suggestions)
    assert any("--engine vllm" in s for s in v3.suggestions)
    big = plan_memory(shapes["deepseek-v3"], None, gpus=8, gpu_memory_gib=141)
    assert big.fits and big.placement == "balanced over 8 GPUs"
    tp = plan_memory(shapes["deepseek-v3"], None, engine="vllm", gpus=8, gpu_memory_gib=141)
    # An MLA latent is replicated on every tensor-parallel rank; a balanced split keeps each layer's KV once.
    assert tp.fits and "tensor parallel over 8" in tp.placement and 0 < tp.kv_tokens < big.kv_tokens
    bf16 = plan_memory(shapes["deepseek-llm-7b-base"], "none", gpu_memory_gib=12)
    assert not bf16.fits and any(s.startswith("--quantization nf4") for s in bf16.suggestions)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_equals_the_table(tmp_path, capsys):
    model = str(_model_dir(tmp_path, "deepseek-v2-lite"))
    rc, table, _ = _run(capsys, "--model", model, "--gpus", "2", "--gpu-memory", "24")
    assert rc == 0
    rc, out, _ = _run(capsys, "--model", model, "--gpus", "2", "--gpu-memory", "24", "--json")
    plan = json.loads(out)
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    for part in plan["parts"]:
        row = " ".join(rows[part["name"]])
        assert f"{part['params']:,}" in row and f"{part['bytes'] / GIB:.2f}" in row
    assert f"{plan['total_bytes'] / GIB:.2f}" in rows["total"]
    assert f"{plan['kv_tokens']:,}" in table and f"placement: {plan['placement']}" in table
    assert plan["quantization"] == "nf4" and plan["fits"] is True


def test_flags_set_the_lora_slots(tmp_path, capsys):
    model = str(_model_dir(tmp_path, "deepseek-llm-7b-base"))
    rc, out, _ = _run(capsys, "--model", model, "--max-loras", "2", "--max-lora-rank", "8", "--json")
    lora = json.loads(out)["parts"][-1]
    assert rc == 0 and lora["name"] == "LoRA slots (2 x r8)"
    assert lora["bytes"] == 2 * 8 * 2 * _hand_counts(json.loads((FIXTURES / "deepseek-llm-7b-base.json")
                                                                 .read_text()))["lora_in_out"]


def test_a_pre_quantized_checkpoint_refuses_another_quantization(tmp_path, capsys):
    model = str(_model_dir(tmp_path, "deepseek-v3"))
    rc, _, err = _run(capsys, "--model", model, "--quantization", "nf4")
    assert rc == 2 and "already quantized (fp8" in err and "--quantization none" in err
    rc, out, _ = _run(capsys, "--model", model, "--quantization", "none", "--json")
    assert rc == 0 and json.loads(out)["quantization"] == "fp8 (checkpoint)"


def test_the_vllm_engine_refuses_fp4(tmp_path, capsys):
    rc, _, err = _run(capsys, "--model", str(_model_dir(tmp_path, "deepseek-v2-lite")), "--engine", "vllm",
                      "--quantization", "fp4")
    assert rc == 2 and "NF4 only, not fp4" in err


def test_a_bad_model_dir_is_one_clear_line_and_a_non_zero_exit(tmp_path):
    exe = Path(sys.executable).with_name("loraserve")
    missing = subprocess.run([str(exe), "plan", "--model", str(tmp_path / "nope")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().count("\n") == 0 and "is not a model directory" in missing.stderr
    hub = subprocess.run([str(exe), "plan", "--model", "no-such-org/no-such-model"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert hub.returncode == 2 and hub.stderr.strip().count("\n") == 0 and "cannot be fetched" in hub.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["plan", "--model", str(empty)])
    assert rc == 2
    broken = tmp_path / "broken"
    shutil.copytree(empty, broken)
    (broken / "config.json").write_text("{not json")
    assert main(["plan", "--model", str(broken)]) == 2
