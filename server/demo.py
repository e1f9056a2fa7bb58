"""`loraserve demo`: the real product end to end on a machine with no hub access.

Builds a tiny DeepSeek-architecture base and a few random PEFT adapters locally, starts a real
`loraserve serve` subprocess on 127.0.0.1 (base quantized as a real checkpoint would be), then
drives it only through the public surfaces a user has: the Python gRPC client and the
Prometheus endpoint (the steps are in `server.demo_steps`). Ends with a SIGTERM drain, whose
exit code must be 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

from server.client import LoraserveClient, LoraserveClientError
from server.demo_steps import DemoFailure, heading, run_steps

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
        server = _DemoServer.start(root, base_dir, root / "imports", quantization)
        try:
            return _drive(server, adapters)
        finally:
            server.kill()  # a no-op once it has exited; otherwise a failed demo leaves nothing behind


def _drive(server: _DemoServer, adapters: dict[str, Path]) -> int:
    """Wait for SERVING, run the client steps, then SIGTERM; returns the demo's exit code."""
    try:
        print(f"$ {' '.join(server.args[2:])}\n  log: {server.log_path}")
        started = time.monotonic()
        server.wait_serving(START_TIMEOUT_S)
        print(f"SERVING on {server.target} after {time.monotonic() - started:.1f}s "
              f"(metrics on :{server.metrics_port})")
        with LoraserveClient(server.target, timeout=60) as client:
            run_steps(client, adapters, server.metrics_port)
    except (DemoFailure, LoraserveClientError) as exc:
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


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held until every port is chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class _DemoServer:
    """A `loraserve serve` subprocess with its log in a file."""

    def __init__(self, process: subprocess.Popen, args: list[str], port: int, metrics_port: int,
                 log_path: Path) -> None:
        self.process = process
        self.args = args
        self.target = f"127.0.0.1:{port}"
        self.metrics_port = metrics_port
        self.log_path = log_path

    @classmethod
    def start(cls, root: Path, base_dir: Path, imports_dir: Path, quantization: str) -> _DemoServer:
        port, metrics_port = _free_ports(2)
        args = [sys.executable, "-m", "server", "serve", "--model", str(base_dir),
                "--adapters-dir", str(root / "store"), "--host", "127.0.0.1", "--port", str(port),
                "--metrics-port", str(metrics_port), "--quantization", quantization,
                "--max-loras", str(MAX_LORAS), "--import-roots", str(imports_dir)]
        log_path = root / "server.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return cls(process, args, port, metrics_port, log_path)

    def wait_serving(self, timeout: float) -> None:
        """Poll grpc.health.v1 Check until SERVING; fail early if the process dies."""
        deadline = time.monotonic() + timeout
        with LoraserveClient(self.target, timeout=1) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise DemoFailure(f"the server exited with code {self.process.returncode} while starting")
                try:
                    if client.health() == "SERVING":
                        return
                except LoraserveClientError:
                    pass  # port not open yet, or still loading (NOT_SERVING)
                time.sleep(0.2)
        raise DemoFailure(f"the server was not SERVING after {timeout:.0f}s")

    def stop(self, timeout: float) -> int:
        """SIGTERM and wait for the drain; SIGKILL if it hangs. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                print(f"the server did not exit {timeout:.0f}s after SIGTERM; killed it", file=sys.stderr)
        return self.process.returncode

    def kill(self) -> None:
        """Stop at once (a failed demo has nothing to drain)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
