"""A real `loraserve serve` process on 127.0.0.1 for end-to-end tests, with raw gRPC stubs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.gen.loraserve.v1 import adapters_pb2_grpc, inference_pb2_grpc, server_info_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A started server and stubs connected to it. `credentials` (grpc.ssl_channel_credentials)
    make the stubs' channel, the health checks of `wait_serving` included, speak TLS to a server
    started with --tls-cert; None keeps it plaintext."""

    def __init__(self, process: subprocess.Popen, port: int, metrics_port: int, log_path: Path,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.process = process
        self.port = port
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.target = f"127.0.0.1:{port}"
        self.channel = (grpc.insecure_channel(self.target) if credentials is None
                        else grpc.secure_channel(self.target, credentials))
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.info = server_info_pb2_grpc.ServerInfoServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.channel.close()
        return self.process.returncode


def start_server(tmp: Path, model: Path, adapters_dir: Path, *extra: str, env: dict | None = None,
                 log_level: str = "WARNING", credentials: grpc.ChannelCredentials | None = None,
                 prefix: tuple[str, ...] = (), port: int | None = None,
                 metrics_port: int | None = None) -> ServerProcess:
    """`prefix`: a command the server runs under (it must exec the server's own command line,
    given as its arguments); `port` / `metrics_port`: fixed ports instead of free ones."""
    port = port if port is not None else free_port()
    metrics_port = metrics_port if metrics_port is not None else free_port()
    log_path = tmp / f"server-{port}-{time.monotonic_ns()}.log"
    args = [*prefix, sys.executable, "-m", "server", "--log-level", log_level, "serve", "--model", str(model),
            "--adapters-dir", str(adapters_dir),
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), *extra]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
    return ServerProcess(process, port, metrics_port, log_path, credentials)


@contextmanager
def running_server(tmp: Path, model: Path, adapters_dir: Path, *extra: str, env: dict | None = None,
                   log_level: str = "WARNING", credentials: grpc.ChannelCredentials | None = None,
                   prefix: tuple[str, ...] = ()):
    server = start_server(tmp, model, adapters_dir, *extra, env=env, log_level=log_level, credentials=credentials,
                          prefix=prefix)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()
