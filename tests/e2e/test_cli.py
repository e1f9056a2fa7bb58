"""The `loraserve` command as a user runs it: a real subprocess."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoTokenizer


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraserve", *args], capture_output=True, text=True, timeout=timeout)


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


@pytest.mark.slow
def test_demo_trains_registers_and_serves_the_example_adapters(tmp_path):
    """The README's main command: trains the three example adapters on a tiny NF4 base, serves
    them from a real server subprocess over gRPC, checks each answers its task, drains."""
    result = _run("demo", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Traceback" not in result.stderr
    tasks = ("medical-terms", "format-conversion", "style-formal")
    for name in tasks:  # trained: one line each with a falling loss
        row = re.search(rf"^{name} +(\d+) +(\d+) +([\d.]+) +([\d.]+) +[\d.]+$", out, re.MULTILINE)
        assert row and float(row.group(4)) < float(row.group(3)) / 4, name
        assert (tmp_path / "trained" / name / "manifest.json").is_file()
    assert re.search(r"SERVING on 127\.0\.0\.1:\d+", out)
    assert "quantization=nf4" in out and "max_loras=2" in out
    assert re.search(r"uploaded +medical-terms: \d+ bytes over gRPC, r=16, 2 files, new", out)
    for name in tasks[1:]:
        assert f"registered {name}: from <import root>/{name}" in out
    # Side by side: each adapter answers (at least 75% of) its own task exactly, the base none.
    for name in tasks:
        row = re.search(rf"^{name} +(\d+) +(\d+)/\d+ +(\d+)/\d+ *$", out, re.MULTILINE)
        assert row, name
        n, base_ok, adapter_ok = map(int, row.groups())
        assert n >= 36 and base_ok == 0 and adapter_ok >= 0.75 * n, row.group(0)
    stream = re.search(r"(\d+) deltas, first after \d+ ms.*finish_reason=eos", out)
    assert stream and int(stream.group(1)) >= 2
    assert "client error: code=NOT_FOUND" in out and "no-such-adapter" in out
    assert re.search(r'loraserve_requests_total\{adapter="medical-terms",code="OK",tenant="default"\} 41.0', out)
    assert 'loraserve_requests_total{adapter="",code="NOT_FOUND",tenant="default"} 1.0' in out
    assert 'loraserve_adapter_loads_total{tier="gpu"}' in out and 'vllm:lora_requests_info{max_lora="2"' in out
    assert "server exited with code 0" in out
    again = _run("demo", "--workdir", str(tmp_path))  # a second run reuses the trained adapters
    assert again.returncode == 0 and again.stdout.count("already trained on this base") == 3


def test_help_documents_every_subcommand():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("init-model", "demo", "bench"):
        assert command in result.stdout
    bench = _run("bench", "engine", "--help")
    assert "--json" in bench.stdout and "default" in bench.stdout
