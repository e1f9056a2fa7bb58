"""LoRA / QLoRA fine-tuning on the same base loading the server uses, producing an adapter the
server serves exactly as trained.

transformers' Trainer runs the loop (gradient accumulation, schedules, evaluation, early
stopping, checkpoints and resume, multi-GPU through `accelerate launch`); TRL's SFTTrainer
would add little here, since the data module already builds prompts with the base's chat
template and masks the loss to the response tokens.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.utils.error import NoMatchingPeftModuleError
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from loraserve.base.loading import load_base
from loraserve.base.moe_experts import EXPERT_WEIGHTS, fourbit_experts_modules, routed_experts_modules, weight_bytes
from loraserve.config import BaseModelConfig
from loraserve.errors import AdapterIncompatible
from loraserve.lora.peft_compat import keep_module_targets
from loraserve.lora.targets import PRESETS, target_regex
from loraserve.lora.wrapping import supported_linear_names
from loraserve.store.peft_names import PREFIX as PEFT_PREFIX
from loraserve.trainer.config import TrainConfig
from loraserve.trainer.data import collate, load_examples, split_examples
from loraserve.trainer.expert_lora import EXPERTS_MODULE, FourBitExpertsLora
from loraserve.trainer.output import write_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path | None
    """None in the other processes of a multi-GPU run: only the main one writes the adapter."""
    manifest: dict


def train(config: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Train one adapter and write it (atomically) under `config.output_dir`. `callbacks` are
    extra transformers TrainerCallbacks (progress reporting, or interrupting in tests)."""
    set_seed(config.seed)
    started = time.monotonic()
    base = load_base(BaseModelConfig(config.model, quantization=config.quantization), for_training=True)
    tokenizer = base.tokenizer
    examples, report = load_examples(config.train_file, tokenizer, config.max_seq_length, config.skip_bad_lines)
    if config.eval_file:
        train_set = examples
        eval_set, eval_report = load_examples(config.eval_file, tokenizer, config.max_seq_length,
                                              config.skip_bad_lines)
    else:
        train_set, eval_set = split_examples(examples, config.eval_fraction, config.seed)
        eval_report = None
    model = _prepare(base.model, config)
    peft_model = _with_lora(model, config)
    _reset_peak_rss()  # from here the peak covers training itself, not the one-off load
    on_gpu = torch.cuda.is_available()
    trainer = Trainer(
        model=peft_model, args=_arguments(config, has_eval=bool(eval_set), on_gpu=on_gpu),
        train_dataset=train_set, eval_dataset=eval_set or None,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=([EarlyStoppingCallback(config.early_stopping_patience)] if config.early_stopping_patience else [])
        + list(callbacks or []))
    initial = trainer.evaluate() if eval_set else {}
    resume_from = get_last_checkpoint(str(config.checkpoints)) if config.resume and config.checkpoints.is_dir() else None
    outcome = trainer.train(resume_from_checkpoint=resume_from)
    final = trainer.evaluate() if eval_set else {}
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {"train_loss": outcome.training_loss, "first_train_loss": logged[0] if logged else None,
               "final_train_loss": logged[-1] if logged else None,
               "steps": outcome.global_step}
    if eval_set:
        metrics.update(initial_eval_loss=initial["eval_loss"], eval_loss=final["eval_loss"],
                       eval_perplexity=math.exp(min(final["eval_loss"], 50.0)))
    manifest = _manifest(config, base, report, eval_report, metrics, started, on_gpu)
    manifest["peak_memory_bytes"]["base_weights"] = weight_bytes(peft_model)
    if not trainer.is_world_process_zero():
        return TrainResult(None, manifest)
    path = write_adapter(peft_model, config.output_dir, config.adapter_name, manifest, tenant=config.tenant)
    log.warning("wrote adapter %s: %s", config.adapter_name, json.dumps(metrics))
    return TrainResult(path, manifest)


def _prepare(model, config: TrainConfig):
    kwargs = {"use_reentrant": False}  # non-reentrant checkpointing works with frozen inputs
    if config.quantization != "none":
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=kwargs)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    return model


def _with_lora(model, config: TrainConfig):
    """PEFT LoRA on the chosen targets, refused when the server could not serve the result."""
    servable = set(supported_linear_names(model))
    regex = target_regex(config.target) if config.target in PRESETS else config.target
    experts = fourbit = None
    if config.routed_experts:
        fourbit = [m for _, m in fourbit_experts_modules(model)]
        if not fourbit and not routed_experts_modules(model):
            raise AdapterIncompatible("routed_experts: this base has no fused routed MoE experts "
                                      "(DeepSeek-V2/V3 have them)")
        if fourbit:  # QLoRA on the 4-bit experts: our PEFT custom layer (trainer/expert_lora.py)
            regex = f"(?:{regex})|(?:{EXPERTS_MODULE})"
        else:  # full-precision fused experts: PEFT's own ParamWrapper
            experts = [f"mlp.experts.{p}" for p in EXPERT_WEIGHTS]
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      use_rslora=config.use_rslora, target_modules=regex, bias="none", task_type="CAUSAL_LM",
                      target_parameters=experts)
    if fourbit:
        lora._register_custom_module({type(fourbit[0]): FourBitExpertsLora})
    try:
        with keep_module_targets():
            peft_model = get_peft_model(model, lora)
    except NoMatchingPeftModuleError as exc:
        raise AdapterIncompatible(f"target {config.target!r} matches no module of this base ({exc})") from None
    targeted = set(peft_model.targeted_module_names)
    if not targeted:
        raise AdapterIncompatible(f"target {config.target!r} matches no module of this base")
    # PEFT names modules inside its wrapper; the served base names them without the prefix.
    unservable = sorted(t for t in targeted if t.removeprefix(PEFT_PREFIX) not in servable
                        and not (fourbit and re.fullmatch(EXPERTS_MODULE, t)))
    if unservable or (getattr(peft_model.peft_config["default"], "target_parameters", None) and not experts):
        raise AdapterIncompatible(f"target {config.target!r} reaches modules the server does not serve "
                                  f"(e.g. {(unservable or ['routed MoE experts'])[0]})")
    return peft_model


def _arguments(config: TrainConfig, has_eval: bool, on_gpu: bool) -> TrainingArguments:
    per_epoch = "steps" if config.eval_steps else "epoch"
    return TrainingArguments(
        output_dir=str(config.checkpoints), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,  # < 1 is a ratio in transformers 5
        weight_decay=config.weight_decay, num_train_epochs=config.epochs, max_steps=config.max_steps,
        logging_steps=config.logging_steps, logging_first_step=True, eval_strategy=per_epoch if has_eval else "no",
        eval_steps=config.eval_steps or None, save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500, save_total_limit=2, seed=config.seed, data_seed=config.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu, report_to=[],
        remove_unused_columns=False, load_best_model_at_end=bool(config.early_stopping_patience and has_eval),
        metric_for_best_model="eval_loss", greater_is_better=False, dataloader_num_workers=0)


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM); elsewhere a no-op. Memory the
    load freed (e.g. full-precision weights before quantization) is first handed back to the
    OS with glibc's malloc_trim, or it would stay resident and count toward the peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss_since_reset() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _manifest(config: TrainConfig, base, report, eval_report, metrics: dict, started: float, on_gpu: bool) -> dict:
    import peft
    import transformers

    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "name": config.adapter_name, "source": "trainer", "base_fingerprint": base.fingerprint,
        "base_model": Path(config.model).name, "quantization": config.quantization,
        "dataset": {"train": vars(report), "eval": vars(eval_report) if eval_report else None},
        "hyperparameters": {k: v for k, v in vars(config).items() if k not in ("tasks", "register", "model", "tenant")},
        "metrics": metrics, "seconds": round(time.monotonic() - started, 1),
        "peak_memory_bytes": {"host_rss": peak_host, "host_rss_training": _peak_rss_since_reset(),
                              "accelerator": torch.cuda.max_memory_allocated() if on_gpu else None},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
