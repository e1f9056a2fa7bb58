"""A real `loraserve serve` child process (for `bench serve` and `demo`): start it, wait until
health says SERVING, read how much CPU it has used, and stop it with SIGTERM the way an
orchestrator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.client import LoraserveClient, LoraserveClientError


def free_port() -> int:
    """A port nothing listens on now (another process could still take it before the server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """The server's environment: this process's own, so that thread settings (OMP_NUM_THREADS and
    the like, or their absence) are the same on both sides of a server-vs-in-process comparison."""
    return dict(os.environ, PYTHONUNBUFFERED="1")


class ServerProcess:
    """`python -m server serve <args>` in `server_env()`, its output in `log_path`."""

    def __init__(self, serve_args: list[str], target: str, log_path: Path) -> None:
        self.target = target
        self.log_path = log_path
        self.args = [sys.executable, "-m", "server", "serve", *serve_args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=server_env())

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_serving(self, timeout: float = 180.0) -> float:
        """Block until health is SERVING; returns the seconds waited. Raises with the server's
        log if it exits or is not SERVING within `timeout`."""
        started = time.monotonic()
        with LoraserveClient(self.target, timeout=1.0) as client:
            while time.monotonic() - started < timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with status {self.process.returncode} before serving:\n"
                                       f"{self.log_tail()}")
                try:
                    if client.health() == "SERVING":
                        return time.monotonic() - started
                except LoraserveClientError:  # not listening yet, or NOT_SERVING while it loads
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the server was not SERVING after {timeout:.0f} s:\n{self.log_tail()}")

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

    def kill(self) -> None:
        """Stop at once (nothing to drain); a no-op once the process has exited."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the drain; the exit status (SIGKILL after `timeout`, reported as
        the negative signal number, so a hung shutdown never passes for a clean one)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
