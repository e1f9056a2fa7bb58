"""The trainer's settings: one validated object per run, from a YAML file and/or flags.

Every field below is also a `loraserve train` flag (--field-name); flags win over the file.
`tasks` trains one adapter per entry (each entry overrides fields for that task).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from loraserve.config import QUANTIZATIONS
from loraserve.errors import ConfigError
from loraserve.lora.targets import PRESETS


@dataclass(frozen=True)
class TrainConfig:
    model: str = ""
    """Base model directory or hub id: loaded exactly as the server loads it."""
    quantization: str = "nf4"
    """nf4 (QLoRA) | fp4 | int8 | none (plain LoRA); serve the adapter on the same setting."""
    train_file: str = ""
    """JSONL: chat ({"messages": [...]}), instruction ({"instruction","input","output"}) or
    prompt/completion form."""
    eval_file: str = ""
    """Separate eval JSONL; when empty, `eval_fraction` of train_file is held out."""
    eval_fraction: float = 0.1
    """Share of train_file held out for eval loss and perplexity, in [0, 1)."""
    adapter_name: str = ""
    """The adapter's name (its directory, and its name in a store or server)."""
    output_dir: str = "adapters"
    """Where the finished adapter directory is written (a server's import root or store)."""
    tenant: str = "default"
    """The tenant that owns the adapter when output_dir is a server's store (ignored otherwise)."""
    target: str = "all-linear"
    """attention | mlp | all-linear (dense MLPs + MoE shared experts), or a PEFT regex."""
    routed_experts: bool = False
    """Also train LoRA on DeepSeek-V2/V3's routed MoE experts (their fused gate_up_proj and
    down_proj; saved as PEFT target_parameters). With nf4/fp4 it is QLoRA on the 4-bit experts;
    unquantized (none, int8) it is PEFT's own parameter LoRA, where lora_dropout must be 0."""
    r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator: scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training, in [0, 1)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    max_seq_length: int = 512
    """Longer examples are truncated (the prompt from the left) and counted in the manifest."""
    epochs: float = 3.0
    """Passes over the training set (fractions allowed)."""
    max_steps: int = -1
    """> 0 overrides epochs."""
    batch_size: int = 4
    """Examples per step per device."""
    gradient_accumulation_steps: int = 1
    """Steps whose gradients add up before one optimizer update."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    lr_scheduler: str = "cosine"
    """A transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing: less memory, more compute."""
    seed: int = 42
    """Seeds LoRA init, data order, the eval split and dropout."""
    logging_steps: int = 10
    """One log line (loss, learning rate) every this many steps."""
    eval_steps: int = 0
    """0 = evaluate once per epoch."""
    save_steps: int = 0
    """0 = checkpoint once per epoch."""
    early_stopping_patience: int = 0
    """0 = off; else stop after this many evaluations without improvement."""
    resume: bool = False
    """Continue from the newest checkpoint in the run's checkpoint directory."""
    checkpoint_dir: str = ""
    """Default: <output_dir>/.checkpoints/<adapter_name>."""
    skip_bad_lines: bool = False
    """Skip and count malformed JSONL lines instead of stopping at the first."""
    register: str = ""
    """HOST:PORT of a running server: upload the finished adapter there."""
    tasks: tuple = ()
    """Several tasks in one config: a list of mappings, each overriding fields (adapter_name,
    train_file, ...) and producing its own adapter."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        for name in ("r", "lora_alpha", "max_seq_length", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.routed_experts and self.lora_dropout and self.quantization not in ("nf4", "fp4"):
            raise ConfigError(f"lora_dropout must be 0 with routed_experts on a {self.quantization} base (PEFT has no "
                              f"dropout on the experts' parameter targets), got {self.lora_dropout}; pass "
                              "--lora-dropout 0, or train on nf4/fp4")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")

    def for_tasks(self) -> list[TrainConfig]:
        """One validated config per adapter to train."""
        if not self.tasks:
            return [self._checked()]
        out = []
        for i, task in enumerate(self.tasks):
            if not isinstance(task, dict):
                raise ConfigError(f"tasks[{i}] must be a mapping of settings")
            unknown = set(task) - {f.name for f in fields(self)} - {"tasks"}
            if unknown:
                raise ConfigError(f"tasks[{i}] has unknown settings: {', '.join(sorted(unknown))}")
            out.append(dataclasses.replace(self, tasks=(), **task)._checked())
        names = [c.adapter_name for c in out]
        if len(set(names)) != len(names):
            raise ConfigError("every task needs its own adapter_name")
        return out

    def _checked(self) -> TrainConfig:
        for name in ("model", "train_file", "adapter_name"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (flag --{name.replace('_', '-')} or key {name}:)")
        if self.target not in PRESETS and not any(ch in self.target for ch in "\\.*|("):
            raise ConfigError(f"target {self.target!r} is neither a preset ({', '.join(PRESETS)}) nor a regex")
        return self

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir or Path(self.output_dir) / ".checkpoints" / self.adapter_name)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with any of the settings below")
    for f in fields(TrainConfig):
        if f.name == "tasks":
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = _field_docs().get(f.name, "")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{doc} (default: {f.default})")
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=None, help=f"{doc} (default: {f.default!r})")


def resolve(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config} must hold a mapping of settings")
        unknown = set(data) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise ConfigError(f"unknown settings in {args.config}: {', '.join(sorted(unknown))}")
        values.update(data)
        if "tasks" in values:
            values["tasks"] = tuple(values["tasks"] or ())
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _field_docs() -> dict[str, str]:
    """The attribute docstrings above, for --help (read from this file's source)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
