"""`loraserve demo`: the real product end to end on a machine with no hub access.

Builds a tiny DeepSeek-architecture base and a few random PEFT adapters locally, starts a real
`loraserve serve` subprocess on 127.0.0.1 (base quantized as a real checkpoint would be), then
drives it only through the public surfaces a user has: the Python gRPC client and the
Prometheus endpoint (the steps are in `server.demo_steps`). Ends with a SIGTERM drain, whose
exit code must be 0.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path

from server.client import LoraserveClient, LoraserveClientError
from server.demo_steps import DemoFailure, heading, run_steps
from server.serve_process import ServerProcess, free_port

TARGETS = ("attention", "mlp", "all-linear")
RANKS = (4, 8, 16)
MAX_LORAS = 2  # fewer slots than adapters, so the mixed batch makes the server swap adapters
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0  # above the server's default drain_timeout (30 s)


def run_demo(workdir: str | None, arch: str = "deepseek-v3", quantization: str = "nf4", num_adapters: int = 4) -> int:
    """Run the demo; returns a process exit code (0 only if every step worked and the server
    exited 0 after SIGTERM)."""
    if num_adapters < 1:
        raise ValueError(f"--adapters must be at least 1, got {num_adapters}")
    with ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraserve-demo-")))
        root.mkdir(parents=True, exist_ok=True)
        heading("1. build a tiny base and random adapters")
        base_dir, adapters = _build_world(root, arch, num_adapters)
        heading("2. start the server")
        server, metrics_port = _start_server(root, base_dir, root / "imports", quantization)
        try:
            return _drive(server, metrics_port, adapters)
        finally:
            server.kill()  # a no-op once it has exited; otherwise a failed demo leaves nothing behind


def _drive(server: ServerProcess, metrics_port: int, adapters: dict[str, Path]) -> int:
    """Wait for SERVING, run the client steps, then SIGTERM; returns the demo's exit code."""
    try:
        print(f"$ {' '.join(server.args[2:])}\n  log: {server.log_path}")
        waited = server.wait_serving(START_TIMEOUT_S)
        print(f"SERVING on {server.target} after {waited:.1f}s (metrics on :{metrics_port})")
        with LoraserveClient(server.target, timeout=60) as client:
            run_steps(client, adapters, metrics_port)
    except (DemoFailure, LoraserveClientError, RuntimeError, TimeoutError) as exc:
        print(f"\ndemo failed: {exc}\n--- {server.log_path} (last lines) ---\n{server.log_tail()}",
              file=sys.stderr)
        return 1
    heading("10. stop the server (SIGTERM: drain, then exit)")
    code = server.stop(STOP_TIMEOUT_S)
    print(f"server exited with code {code}")
    if code != 0:
        print(f"--- {server.log_path} (last lines) ---\n{server.log_tail()}", file=sys.stderr)
        return 1
    print("\ndemo finished: every step went through the real gRPC server and its metrics endpoint.")
    return 0


def _build_world(root: Path, arch: str, num_adapters: int) -> tuple[Path, dict[str, Path]]:
    """The base in root/base and adapters in root/imports/<name>; reused when already there."""
    # Imported here: torch and transformers are only needed to build, never to talk to the server.
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from server.base.synthetic import init_model
    from server.lora.synthetic import make_random_adapter

    hf_logging.disable_progress_bar()
    base_dir = root / "base"
    if not (base_dir / "config.json").exists():
        init_model(base_dir, arch, "tiny", seed=0)
    print(f"base: tiny {arch} at {base_dir}")
    adapters: dict[str, Path] = {}
    fp32 = None
    for i in range(num_adapters):
        name, path = f"task-{i}", root / "imports" / f"task-{i}"
        if not (path / "adapter_config.json").exists():
            if fp32 is None:  # one fp32 copy of the base serves every adapter
                fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # PEFT calls a deprecated transformers API
                make_random_adapter(base_dir, path, r=RANKS[i % len(RANKS)], lora_alpha=16,
                                    target=TARGETS[i % len(TARGETS)], seed=i, model=fp32)
        adapters[name] = path
    print(f"adapters: {', '.join(adapters)} under {root / 'imports'}")
    return base_dir, adapters


def _start_server(root: Path, base_dir: Path, imports_dir: Path, quantization: str) -> tuple[ServerProcess, int]:
    """The server subprocess and its metrics port."""
    port, metrics_port = free_port(), free_port()
    args = ["--model", str(base_dir), "--adapters-dir", str(root / "store"), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--quantization", quantization,
            "--max-loras", str(MAX_LORAS), "--import-roots", str(imports_dir)]
    return ServerProcess(args, f"127.0.0.1:{port}", root / "server.log"), metrics_port
