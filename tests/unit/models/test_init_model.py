"""Synthetic DeepSeek checkpoints load and behave like downloaded ones.

Each arch's tiny model is built once per module (about 50 ms each) into pytest's tmp dir and
loaded through the Auto classes, exactly as the server and trainer load a real checkpoint.
"""

from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraserve.devtools.synthetic_base import ARCHS, SHAPES, init_model, synthetic_config
from loraserve.devtools.synthetic_tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    USER_TOKEN,
    build_tokenizer,
)

ROUND_TRIP_STRINGS = [
    "Hello, world!",
    "窦性心律不齐",
    "患者主诉胸闷三天，诊断：窦性心律不齐。",
    "emoji 👋🙂🚀 and a family 👨‍👩‍👧 and flags 🇨🇳🇫🇷",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n",
    '{"r": 8, "target_modules": ["q_proj", "kv_b_proj"]}',
    "  leading spaces, trailing spaces   ",
    "\n\n\r\n\t \u00a0mixed\u3000whitespace\n",
    "combining e\u0301 and NUL \x00 and ünïcödé",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "窦性心律不齐?"},
]

EXPECTED_CHAT = {
    "deepseek-llm": f"{BOS_TOKEN}You are terse.\n\nUser: Hi\n\nAssistant: Hello!{EOS_TOKEN}"
    "User: 窦性心律不齐?\n\nAssistant:",
    "deepseek-v2": f"{BOS_TOKEN}You are terse.\n\nUser: Hi\n\nAssistant: Hello!{EOS_TOKEN}"
    "User: 窦性心律不齐?\n\nAssistant:",
    "deepseek-v3": f"{BOS_TOKEN}You are terse.{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello!{EOS_TOKEN}"
    f"{USER_TOKEN}窦性心律不齐?{ASSISTANT_TOKEN}",
}

# Module names every checkpoint of the arch has; layer 0 is dense, layer 1 is MoE for v2/v3.
EXPECTED_MODULES = {
    "deepseek-v3": [
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.0.self_attn.q_a_layernorm",
        "model.layers.0.self_attn.q_b_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.shared_experts.gate_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
    ],
    "deepseek-v2": [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.shared_experts.up_proj",
    ],
    "deepseek-llm": [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ],
}

ABSENT_MODULES = {
    "deepseek-v3": ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.shared_experts"],
    "deepseek-v2": ["model.layers.0.self_attn.q_a_proj", "model.layers.0.mlp.shared_experts"],
    "deepseek-llm": ["model.layers.0.self_attn.kv_b_proj", "model.layers.1.mlp.shared_experts"],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: init_model(root / arch, arch, "tiny", seed=0) for arch in ARCHS}


def _load(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _checkpoint_keys(model_dir: Path) -> set[str]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_auto_classes_and_runs(model_dirs: dict[str, Path], arch: str) -> None:
    model, tokenizer = _load(model_dirs[arch])
    expected_class = {
        "deepseek-v3": "DeepseekV3ForCausalLM",
        "deepseek-v2": "DeepseekV2ForCausalLM",
        "deepseek-llm": "LlamaForCausalLM",
    }[arch]
    assert type(model).__name__ == expected_class
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.max_position_embeddings >= 2048
    assert tokenizer.model_max_length == model.config.max_position_embeddings
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    batch = tokenizer(["The patient", "窦性心律不齐"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits  # [B, T, V]
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_module_and_weight_names_match_deepseek_checkpoints(model_dirs: dict[str, Path], arch: str) -> None:
    model, _ = _load(model_dirs[arch])
    names = {name for name, _ in model.named_modules()}
    for name in EXPECTED_MODULES[arch]:
        assert name in names
    for name in ABSENT_MODULES[arch]:
        assert name not in names

    # On disk, routed experts are one module per expert, as in DeepSeek's own safetensors, even
    # though transformers fuses them into 3D tensors in memory.
    keys = _checkpoint_keys(model_dirs[arch])
    if arch == "deepseek-llm":
        assert not any(".experts." in k for k in keys)
    else:
        n_experts = SHAPES["tiny"].n_routed_experts
        for e in range(n_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.1.mlp.experts.{e}.{proj}.weight" in keys
        assert not any(k.startswith("model.layers.0.mlp.experts") for k in keys)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_identical_bytes_other_seed_differs(
    model_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    again = init_model(tmp_path / "again", arch, "tiny", seed=0)
    other = init_model(tmp_path / "other", arch, "tiny", seed=1)
    reference = model_dirs[arch]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (reference / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (reference / "model.safetensors").read_bytes()


def test_init_model_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_model(tmp_path / "m", "deepseek-llm", "tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_tokenizer_round_trips_exactly(model_dirs: dict[str, Path], arch: str, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos == [tokenizer.bos_token_id] + ids
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_are_single_ids(model_dirs: dict[str, Path], arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    if arch == "deepseek-v3":
        specials += [USER_TOKEN, ASSISTANT_TOKEN]
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in specials]
    assert all(len(token_ids) == 1 for token_ids in ids)
    assert [i[0] for i in ids] == list(range(len(specials)))  # BOS=0, EOS=1, PAD=2, then roles
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_token_id == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_renders_deepseek_format(model_dirs: dict[str, Path], arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text == EXPECTED_CHAT[arch]

    generation_prompt = "<｜Assistant｜>" if arch == "deepseek-v3" else "Assistant:"
    without_prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert without_prompt == EXPECTED_CHAT[arch].removesuffix(generation_prompt)

    # Tokenized, the template's own BOS is the only one: no second BOS from the post-processor.
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_chat_template_rejects_unknown_role(model_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["deepseek-v3"])
    with pytest.raises(TemplateError, match="unsupported role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_greedy_outputs_vary(model_dirs: dict[str, Path], arch: str) -> None:
    model, tokenizer = _load(model_dirs[arch])
    continuations = set()
    for prompt in ("The patient", "def f(x):", "窦性心律不齐", '{"a": 1}'):
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = out[0, inputs.input_ids.shape[1] :].tolist()  # [max_new_tokens]
        assert len(set(new)) > 1, f"{arch} collapsed to one token for {prompt!r}: {new}"
        continuations.add(tuple(new))
    assert len(continuations) == 4


def test_refuses_non_empty_output_dir(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=str(target)):
        init_model(target, "deepseek-v3")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging dir left behind


def test_fills_existing_empty_dir(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    assert init_model(target, "deepseek-v2") == target
    assert (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_rejects_unknown_arch_and_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deepseek-v4"):
        init_model(tmp_path / "m", "deepseek-v4")
    with pytest.raises(ValueError, match="huge"):
        init_model(tmp_path / "m", "deepseek-v3", size="huge")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_small_size_has_20_to_30m_parameters(arch: str) -> None:
    vocab_size = len(build_tokenizer(arch, SHAPES["small"].vocab_target))
    config = synthetic_config(arch, "small", vocab_size)
    assert config.max_position_embeddings >= 2048
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 20e6 <= n_params <= 30e6, f"{arch} small has {n_params:,} parameters"
