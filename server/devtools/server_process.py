"""A real `loraserve serve` child process, for the tests, the demo and the benchmarks: start it,
wait until health says SERVING, talk to it with raw gRPC stubs, read how much CPU it has used,
and stop it with SIGTERM the way an orchestrator would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.proto.v1 import adapters_pb2_grpc, inference_pb2_grpc, server_info_pb2_grpc


def free_port() -> int:
    """A port nothing listens on now (another process could still take it before the server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this process's own (so thread settings such as OMP_NUM_THREADS,
    or their absence, are the same on both sides of a server-vs-in-process comparison), unbuffered
    output, and `extra`."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))


class ServerProcess:
    """`python -m loraserve [--log-level L] serve <serve_args>`, its output in `log_path`.

    `target` is the address its gRPC port answers on. `prefix`: a command the server runs under
    (it must exec the server's own command line, given as its arguments). `credentials`
    (grpc.ssl_channel_credentials) make the stubs' channel, health checks included, speak TLS."""

    def __init__(self, serve_args: Sequence[str], target: str, log_path: Path, *, log_level: str | None = None,
                 env: dict[str, str] | None = None, prefix: Sequence[str] = (),
                 credentials: grpc.ChannelCredentials | None = None, metrics_port: int = 0) -> None:
        self.target = target
        self.port = int(target.rsplit(":", 1)[1])
        self.metrics_port = metrics_port
        self.log_path = log_path
        self._credentials = credentials
        level = ["--log-level", log_level] if log_level else []
        self.args = [*prefix, sys.executable, "-m", "loraserve", *level, "serve", *serve_args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=server_env(env))

    # ---- talking to it -------------------------------------------------------------------
    @cached_property
    def channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self._credentials)

    @cached_property
    def inference(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    @cached_property
    def adapters(self) -> adapters_pb2_grpc.AdapterServiceStub:
        return adapters_pb2_grpc.AdapterServiceStub(self.channel)

    @cached_property
    def info(self) -> server_info_pb2_grpc.ServerInfoServiceStub:
        return server_info_pb2_grpc.ServerInfoServiceStub(self.channel)

    @cached_property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def wait_serving(self, timeout: float = 180.0) -> float:
        """Block until health is SERVING; returns the seconds waited. Raises with the server's
        log if it exits or is not SERVING within `timeout`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode} before serving:\n"
                                   f"{self.log_tail()}")
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:  # not listening yet, or NOT_SERVING while it loads
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not SERVING after {timeout:.0f} s:\n{self.log_tail()}")

    # ---- its resources -------------------------------------------------------------------
    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server so far, its engine process included (Linux
        /proc; None elsewhere)."""
        split = self.cpu_split()
        return None if split is None else sum(split.values())

    def cpu_split(self) -> dict[str, float] | None:
        """CPU seconds so far of the server's own process ("front": gRPC, access, store) and of
        its child processes ("engine"); None where /proc is missing."""
        try:
            return {"front": _cpu_seconds(self.process.pid),
                    "engine": sum(_cpu_seconds(pid) for pid in _children(self.process.pid))}
        except OSError:
            return None

    # ---- stopping it ---------------------------------------------------------------------
    def kill(self) -> None:
        """Stop at once (nothing to drain); a no-op once the process has exited."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._close()

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGTERM: drain), then wait; the exit status (SIGKILL after `timeout`,
        reported as the negative signal number, so a hung shutdown never passes for a clean one)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()
        return self.process.returncode

    def _close(self) -> None:
        if "channel" in self.__dict__:
            self.channel.close()


def start_server(workdir: Path, model: Path, adapters_dir: Path, *extra: str, env: dict | None = None,
                 log_level: str = "WARNING", credentials: grpc.ChannelCredentials | None = None,
                 prefix: Sequence[str] = (), port: int | None = None, metrics_port: int | None = None,
                 threads: int | None = 1) -> ServerProcess:
    """A server on 127.0.0.1 for `model` and the store `adapters_dir`, with `extra` serve flags,
    its log under `workdir`; free ports unless given. `threads`: OMP_NUM_THREADS of the server
    (1 by default: tiny models gain nothing from a second thread, and the tests share 2 CPUs)."""
    port = port if port is not None else free_port()
    metrics_port = metrics_port if metrics_port is not None else free_port()
    args = ["--model", str(model), "--adapters-dir", str(adapters_dir), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), *extra]
    environment = dict(env or {})
    if threads is not None:
        environment.setdefault("OMP_NUM_THREADS", str(threads))
    log_path = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    return ServerProcess(args, f"127.0.0.1:{port}", log_path, log_level=log_level, env=environment, prefix=prefix,
                         credentials=credentials, metrics_port=metrics_port)


@contextmanager
def running_server(workdir: Path, model: Path, adapters_dir: Path, *extra: str, **options) -> Iterator[ServerProcess]:
    """`start_server`, SERVING, stopped (SIGTERM) when the block ends."""
    server = start_server(workdir, model, adapters_dir, *extra, **options)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    """The descendant processes of `pid` (Linux /proc): the engine process, or vLLM's engine
    core and its workers."""
    direct = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    found = list(direct)
    for child in direct:
        with contextlib.suppress(OSError):  # it just exited
            found += _children(child)
    return found


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
