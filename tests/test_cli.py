"""The `loraserve` command as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from transformers import AutoConfig, AutoTokenizer


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=timeout)


def test_init_model_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "m"
    result = _run("init-model", str(out), "--arch", "deepseek-v2", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert AutoConfig.from_pretrained(out).model_type == "deepseek_v2"
    assert AutoTokenizer.from_pretrained(out).decode(AutoTokenizer.from_pretrained(out)("窦性")["input_ids"],
                                                     skip_special_tokens=True) == "窦性"
    again = _run("init-model", str(out))
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    assert "Traceback" not in again.stderr


def test_demo_serves_a_mixed_batch(tmp_path):
    result = _run("demo", "--workdir", str(tmp_path), "--adapters", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for name in ("task-0", "task-1", "task-2", "task-3"):
        assert f"registered {name}" in out
    assert "tokens/s" in out and "evictions" in out


def test_help_documents_every_subcommand():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("init-model", "demo", "bench"):
        assert command in result.stdout
    bench = _run("bench", "engine", "--help")
    assert "--json" in bench.stdout and "default" in bench.stdout
