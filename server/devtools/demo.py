"""`loraserve demo`: the whole loop on a machine with no hub access, in a few minutes on CPUs.

1. build a tiny DeepSeek-architecture base locally;
2. train one LoRA adapter per example dataset in `trainer/examples/` (the bundled trainer,
   on the base quantized as the server will serve it);
3. start a real `loraserve serve` subprocess on 127.0.0.1;
4-10. drive it only through what a user has — the Python gRPC client and the Prometheus
   endpoint (`loraserve.devtools.demo_steps`): register the adapters, show side by side that each one
   answers its own task while the base does not, stream, a client mistake, metrics;
11. SIGTERM: the server drains and must exit 0.
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loraserve.client import LoraserveClient, LoraserveClientError
from loraserve.devtools.demo_steps import DemoFailure, heading, run_steps
from loraserve.devtools.demo_training import build_base, train_tasks
from loraserve.devtools.server_process import ServerProcess, free_port

MAX_LORAS = 2  # fewer slots than adapters, so the mixed batches make the server swap adapters
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0  # above the server's default drain_timeout (30 s)


def run_demo(workdir: str | None, arch: str = "deepseek-v3", quantization: str = "nf4") -> int:
    """Run the demo; returns a process exit code (0 only if every step worked and the server
    exited 0 after SIGTERM)."""
    with ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraserve-demo-")))
        root.mkdir(parents=True, exist_ok=True)
        heading("1. build a tiny base")
        base_dir = build_base(root, arch)
        heading(f"2. train one adapter per example dataset ({quantization} base, loraserve train)")
        tasks = train_tasks(base_dir, root / "trained", quantization)
        heading("3. start the server")
        server, metrics_port = _start_server(root, base_dir, root / "trained", quantization)
        try:
            return _drive(server, metrics_port, tasks)
        finally:
            server.kill()  # a no-op once it has exited; otherwise a failed demo leaves nothing behind


def _drive(server: ServerProcess, metrics_port: int, tasks) -> int:
    """Wait for SERVING, run the client steps, then SIGTERM; returns the demo's exit code."""
    try:
        print(f"$ {' '.join(server.args[2:])}\n  log: {server.log_path}")
        waited = server.wait_serving(START_TIMEOUT_S)
        print(f"SERVING on {server.target} after {waited:.1f}s (metrics on :{metrics_port})")
        with LoraserveClient(server.target, timeout=120) as client:
            run_steps(client, tasks, metrics_port)
    except (DemoFailure, LoraserveClientError, RuntimeError, TimeoutError) as exc:
        print(f"\ndemo failed: {exc}\n--- {server.log_path} (last lines) ---\n{server.log_tail()}",
              file=sys.stderr)
        return 1
    heading("11. stop the server (SIGTERM: drain, then exit)")
    code = server.stop(STOP_TIMEOUT_S)
    print(f"server exited with code {code}")
    if code != 0:
        print(f"--- {server.log_path} (last lines) ---\n{server.log_tail()}", file=sys.stderr)
        return 1
    print("\ndemo finished: data -> trained adapters -> registered in a running server -> each answers its task.")
    return 0


def _start_server(root: Path, base_dir: Path, imports_dir: Path, quantization: str) -> tuple[ServerProcess, int]:
    """The server subprocess and its metrics port."""
    port, metrics_port = free_port(), free_port()
    args = ["--model", str(base_dir), "--adapters-dir", str(root / "store"), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--quantization", quantization,
            "--max-loras", str(MAX_LORAS), "--import-roots", str(imports_dir)]
    return ServerProcess(args, f"127.0.0.1:{port}", root / "server.log"), metrics_port
