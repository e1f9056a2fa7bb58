"""The `loraserve` command as a user runs it: a real subprocess."""

from __future__ import annotations

import re
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
    """The demo drives a real server subprocess over gRPC and HTTP, then drains it with SIGTERM."""
    result = _run("demo", "--workdir", str(tmp_path), "--adapters", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Traceback" not in result.stderr
    assert re.search(r"SERVING on 127\.0\.0\.1:\d+", out)
    assert "quantization=nf4" in out and "max_loras=2" in out
    # One adapter uploaded as bytes, the others registered from the import root; all listed.
    assert re.search(r"uploaded +task-0: \d+ bytes over gRPC, r=4, 2 files, new", out)
    for name in ("task-1", "task-2", "task-3"):
        assert f"registered {name}: from <import root>/{name}" in out
        assert re.search(rf"^{name} +\d+ +16 +\d+ +\d+ +register +(gpu|cpu|disk)$", out, re.MULTILINE)
    assert re.search(r"^task-0 +4 +16 +\d+ +\d+ +upload +(gpu|cpu|disk)$", out, re.MULTILINE)
    assert (tmp_path / "store").is_dir() and (tmp_path / "server.log").is_file()
    # Base + four adapters served concurrently; every adapter changes the greedy output.
    for name in ("base", "task-0", "task-1", "task-2", "task-3"):
        assert re.search(rf"^{name} +24 +[\d.]+ +'", out, re.MULTILINE), name
    assert "5 requests, 120 tokens" in out and "5 distinct outputs of 5" in out
    stream = re.search(r"(\d+) deltas, first after \d+ ms.*summary: 24 tokens, finish_reason=length", out)
    assert stream and int(stream.group(1)) >= 2
    assert "client error: code=NOT_FOUND" in out and "no-such-adapter" in out
    # The metrics excerpt counts what the demo did: 2 requests on task-0 (batch + stream), one NOT_FOUND.
    assert 'loraserve_requests_total{adapter="task-0",code="OK"} 2.0' in out
    assert 'loraserve_requests_total{adapter="",code="NOT_FOUND"} 1.0' in out
    assert "loraserve_time_to_first_token_seconds_count 6.0" in out
    assert 'loraserve_adapter_loads_total{tier="gpu"}' in out and 'vllm:lora_requests_info{max_lora="2"' in out
    assert "server exited with code 0" in out


def test_help_documents_every_subcommand():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("init-model", "demo", "bench"):
        assert command in result.stdout
    bench = _run("bench", "engine", "--help")
    assert "--json" in bench.stdout and "default" in bench.stdout
