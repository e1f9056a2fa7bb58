"""The server process's handle on the engine process (`loraserve.engine.engine_process`, which
says why the engine runs apart): the engine contract (`loraserve.engine.contract.Engine`)
forwarded over a pipe. Every remote call of the contract that needs nothing done here is
forwarded as it is (`forward_remote_calls`); the rest are written out below.

What needs no answer from the engine stays here, so the event loop never waits on the other
process: tokenization (the tokenizer is loaded here too), the names of registered adapters (only
this process registers them, so its copy is exact), readiness. `submit` only sends; a request the
engine refuses gets its error on its stream, where the reader raises it as before. Calls that
need an answer block their caller, which is always a worker thread, never the event loop.

If the engine process dies, every open stream and call fails UNAVAILABLE and `on_exit` runs:
the server stops, and its orchestrator starts a fresh one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from loraserve.config import EngineConfig
from loraserve.engine.contract import (
    AdapterEntry,
    BaseInfo,
    CheckedAdapter,
    EngineStats,
    Heartbeat,
    forward_remote_calls,
)
from loraserve.engine.engine_process import LaunchedEngine, launch
from loraserve.engine.input_limits import InputLimits, max_token_bytes
from loraserve.engine.request import ErrorEvent, FinishEvent, GenerationRequest, RequestStream, encode_input
from loraserve.errors import AdapterNotFound, Unavailable

log = logging.getLogger(__name__)

HEARTBEATS_MISSED = 2.5
"""Intervals without a heartbeat after which the engine counts as stopped: past two missed ones
(a heartbeat is sent every interval), so a stopped engine is seen within three intervals."""
STOP_GRACE_S = 30.0
"""How long a stopping engine process may take to exit after it replied to "stop"."""
GONE = "the engine process stopped unexpectedly; this server is shutting down, retry on another replica"


class RemoteStream(RequestStream):
    """A request's stream in the server process; `stream_id` names it on the pipe."""

    def __init__(self, stream_id: int, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        super().__init__(request_id, loop)
        self.stream_id = stream_id


@forward_remote_calls
class RemoteEngine:
    """An engine running in a child process. Thread-safe, like the engine itself."""

    def __init__(self, config: EngineConfig, on_exit: Callable[[], None] | None = None, threads: int = 0,
                 launched: LaunchedEngine | None = None, heartbeat_interval: float = 1.0,
                 stall_timeout: float = 60.0) -> None:
        """Start the engine process (`threads`: the engine_threads setting), or take `launched`,
        one already started for `config`. Returns at once; `wait_loaded` waits for the base.
        `heartbeat_interval` and `stall_timeout`: how `health` judges the engine (settings of
        the same names)."""
        self.config = config
        self._on_exit = on_exit
        self.heartbeat_interval = heartbeat_interval
        self.stall_timeout = stall_timeout
        self._last_heartbeat: tuple[float, Heartbeat] | None = None  # (when it arrived, what it said)
        launched = launched or launch(config, threads, heartbeat_interval)
        self.process, self._conn = launched.process, launched.conn
        self.base: BaseInfo | None = None
        """The loaded base (None until loaded)."""
        self.max_context: int | None = None
        self.tokenizer = None
        self.input_limits: InputLimits | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[int, RemoteStream] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._adapters: dict[str, AdapterEntry] = {}
        self._observers: list[Callable[[float], None]] = []
        self._accepting = False
        self._closing = False
        self.gone = threading.Event()
        self._reader: threading.Thread | None = None

    @classmethod
    def load(cls, config: EngineConfig, on_exit: Callable[[], None] | None = None, threads: int = 0,
             launched: LaunchedEngine | None = None, **health) -> RemoteEngine:
        """Start the engine process and wait until its base is loaded."""
        client = cls(config, on_exit, threads, launched, **health)
        client.wait_loaded()
        return client

    def wait_loaded(self) -> None:
        """Block until the engine process has loaded the base (its load error is raised here, as
        `Engine.load` would raise it), then load the tokenizer here too and start reading."""
        from loraserve.base.tokenizer import load_tokenizer

        info = self._recv_first()
        self.tokenizer = load_tokenizer(info.model_dir, self.config.base.trust_remote_code)
        self.input_limits = InputLimits(self.config.max_input_tokens, max_token_bytes(self.tokenizer))
        self.max_context = info.max_context
        self._last_heartbeat = (time.monotonic(), Heartbeat(0.0, 0, 0))  # loaded: as good as a first beat
        self.base = info
        self._reader = threading.Thread(target=self._read_loop, name="engine-reader", daemon=True)
        self._reader.start()

    @property
    def loaded(self) -> bool:
        return self.base is not None

    def _recv_first(self) -> BaseInfo:
        try:
            kind, value = self._conn.recv()[0]
        except (EOFError, OSError):
            self.process.join(STOP_GRACE_S)
            raise RuntimeError(f"the engine process exited with status {self.process.exitcode} while loading "
                               "the base (its log is above)") from None
        if kind == "failed":
            self.process.join(STOP_GRACE_S)
            raise value
        return value

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, warmup: bool = True) -> None:
        self._call("start", warmup)
        self._accepting = True

    @property
    def ready(self) -> bool:
        """Warmed up, not draining, and alive (see `health`)."""
        return self._accepting and not self.gone.is_set() and self.health() is None

    def health(self) -> str | None:
        """None while the engine is alive and making progress, else why not. Alive means: a
        heartbeat arrived within the last 2.5 intervals (three missing in a row are never waited
        for), and the engine thread last went round its loop within `stall_timeout` seconds.
        A base still loading is alive: the start-up probe, not this, bounds a load."""
        if self.gone.is_set():
            return "the engine process has exited"
        if self._last_heartbeat is None:
            return None
        received, beat = self._last_heartbeat
        silent = time.monotonic() - received
        if silent > HEARTBEATS_MISSED * self.heartbeat_interval:
            return f"the engine process has sent no heartbeat for {silent:.1f}s (stopped or hung)"
        if beat.since_progress_s > self.stall_timeout:
            return (f"the engine has made no progress for {beat.since_progress_s:.0f}s with {beat.running} requests "
                    f"running and {beat.waiting} waiting (a step that does not end)")
        return None

    def drain(self, timeout: float) -> bool:
        self._accepting = False
        return self._call("drain", timeout)

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop the engine and wait for its process to exit (killed after STOP_GRACE_S)."""
        self._accepting = False
        self._closing = True
        if not self.loaded:  # still loading: nothing runs yet, nothing to drain
            self.process.kill()
            self.process.join()
            self._conn.close()
            return
        if not self.gone.is_set():
            try:
                self._call("stop", drain_timeout)
            except Unavailable:
                pass
        self.process.join(STOP_GRACE_S)
        if self.process.is_alive():
            log.error("the engine process did not exit: killing it")
            self.process.kill()
            self.process.join()
        self._conn.close()

    def add_load_observer(self, observe: Callable[[float], None]) -> None:
        self._observers.append(observe)

    # ---- requests ----------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        return encode_input(self.tokenizer, prompt, messages)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request in the engine; its events, or the engine's refusal, come on the stream."""
        if not self.ready:
            raise Unavailable("the engine is not accepting requests (starting up or draining)")
        request.request_id = request.request_id or uuid.uuid4().hex
        stream = RemoteStream(next(self._ids), request.request_id, loop)
        with self._lock:
            if self.gone.is_set():  # checked under the lock that `_fail_all` empties the streams with
                raise Unavailable(GONE)
            self._streams[stream.stream_id] = stream
        self._send(("submit", stream.stream_id, request))
        return stream

    def cancel(self, stream: RequestStream) -> None:
        stream.cancel()
        if isinstance(stream, RemoteStream) and not self.gone.is_set():
            self._send(("cancel", stream.stream_id))

    # ---- adapters ----------------------------------------------------------------------
    def add_adapter(self, adapter_id: str, path: str | Path, replace: bool = False,
                    checked: CheckedAdapter | None = None) -> AdapterEntry:
        entry = self._call("add_adapter", adapter_id, Path(path), replace, checked)
        with self._lock:
            self._adapters[adapter_id] = entry
        return entry

    def remove_adapter(self, adapter_id: str) -> None:
        with self._lock:
            self._adapters.pop(adapter_id, None)
        self._call("remove_adapter", adapter_id)

    def adapter_tier(self, adapter_id: str) -> tuple[str, bool]:
        if not self.has_adapter(adapter_id):
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return self._call("adapter_tier", adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._adapters

    def adapters(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda e: e.adapter_id)

    def stats(self) -> EngineStats:
        if not self.loaded:
            raise Unavailable("the engine is still loading its base")
        return self._call("stats")

    # ---- the pipe ------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            raise Unavailable(GONE) from None

    def _call(self, method: str, *args, **kwargs):
        """Run `method` in the engine process and return its result (or raise its error)."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._lock:
            if self.gone.is_set():
                raise Unavailable(GONE)
            self._calls[call_id] = future
        self._send(("call", call_id, method, args, kwargs))
        return future.result()

    def _read_loop(self) -> None:
        try:
            while True:
                for message in self._conn.recv():
                    self._dispatch(message)
        except (EOFError, OSError):
            pass
        self._fail_all()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "event":
            _, stream_id, event = message
            with self._lock:
                stream = (self._streams.pop(stream_id, None) if isinstance(event, (FinishEvent, ErrorEvent))
                          else self._streams.get(stream_id))
            if stream is not None:
                stream.push(event)
        elif kind == "reply":
            _, call_id, ok, value = message
            with self._lock:
                future = self._calls.pop(call_id, None)
            if future is not None and ok:
                future.set_result(value)
            elif future is not None:
                future.set_exception(value)
        elif kind == "adapter_load":
            for observe in self._observers:
                observe(message[1])
        elif kind == "heartbeat":
            self._last_heartbeat = (time.monotonic(), message[1])

    def _fail_all(self) -> None:
        """The engine process is gone: end everything still waiting on it."""
        self._accepting = False
        with self._lock:
            self.gone.set()
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for stream in streams:
            stream.push(ErrorEvent(Unavailable(GONE)))
        for future in calls:
            future.set_exception(Unavailable(GONE))
        if not self._closing:
            self.process.join(1.0)
            log.error("the engine process exited unexpectedly (status %s)", self.process.exitcode)
            if self._on_exit is not None:
                self._on_exit()

