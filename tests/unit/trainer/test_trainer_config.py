"""The trainer's settings: the commented example config documents every option with its real
default, `--help` documents every flag, and YAML, flags and `tasks:` resolve as documented."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from loraserve.errors import ConfigError
from loraserve.trainer.config import TrainConfig, add_flags, resolve

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "trainer" / "examples" / "train.yaml"
REQUIRED = {"model", "train_file", "adapter_name"}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(argv)


def test_example_config_lists_every_option_with_its_default():
    values = yaml.safe_load(EXAMPLE.read_text())
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(values) == set(fields)
    for name, value in values.items():
        if name in REQUIRED:
            assert value, f"{name} is required and the example gives it"
        elif name == "tasks":
            assert value == []
        else:
            assert value == fields[name].default, f"{name}: example says {value!r}, default is {fields[name].default!r}"
    text = EXAMPLE.read_text()
    for name in fields:  # and each one carries a comment
        line = next(line for line in text.splitlines() if line.startswith(f"{name}:"))
        assert "#" in line, f"{name} has no comment"


def test_help_documents_every_flag_with_its_default():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "tasks":
            continue
        assert "(default: " in actions[f.name].help, f.name


def test_example_config_with_tasks_trains_one_adapter_per_task(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["tasks"] = [{"adapter_name": "a", "r": 8}, {"adapter_name": "b", "train_file": "other.jsonl"}]
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    configs = resolve(_parse("--config", str(path), "--learning-rate", "0.001")).for_tasks()
    assert [(c.adapter_name, c.r, c.train_file, c.learning_rate) for c in configs] == [
        ("a", 8, data["train_file"], 0.001), ("b", 16, "other.jsonl", 0.001)]


@pytest.mark.parametrize("yaml_text, words", [
    ("model: m\nlearnig_rate: 1\n", "unknown settings.*learnig_rate"),
    ("- just a list\n", "mapping"),
    ("model: m\ntrain_file: t\nadapter_name: a\ntasks: [{adapter_name: x, rank: 4}]\n", "tasks\\[0\\].*rank"),
    ("model: m\ntrain_file: t\nadapter_name: a\ntasks: [{adapter_name: x}, {adapter_name: x}]\n", "own adapter_name"),
    ("model: m\ntrain_file: t\nadapter_name: a\nr: 0\n", "r must be at least 1"),
    ("model: m\ntrain_file: t\nadapter_name: a\nquantization: int3\n", "quantization 'int3'"),
    ("model: m\ntrain_file: t\n", "adapter_name is required"),
])
def test_bad_configs_name_the_setting(tmp_path, yaml_text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=words):
        resolve(_parse("--config", str(path))).for_tasks()
