"""The engine process: loads the base, runs a `NativeEngine`, and answers the server process
over one pipe (`RemoteEngine` is the other end; what crosses it is `loraserve.engine.contract`).

Why a process of its own: in one process the gRPC event loop (authentication, protobuf,
refusing a flooding tenant) and the engine thread took turns on one GIL, and each time the
engine released it inside a torch op, it waited for the loop to give it back. Under a flood of
refused calls another tenant's latency grew 9x (measured with `bench tenants`). Two processes have two GILs; the engine's only other work is this module's three
threads, which do little. vLLM splits its API server and EngineCore the same way.

Messages are tuples, pickled by `multiprocessing.connection`:
  server -> engine: ("submit", stream_id, GenerationRequest) | ("cancel", stream_id)
                    | ("call", call_id, method, args, kwargs)
  engine -> server, in lists (one send per burst of events):
                    ("loaded", BaseInfo) | ("failed", error) | ("event", stream_id, Event)
                    | ("reply", call_id, ok, value or error) | ("adapter_load", seconds)
                    | ("heartbeat", Heartbeat)

Heartbeats: a thread of this process sends one every `heartbeat_interval` seconds, carrying how
long ago the engine thread last went round its loop. The server process reads a missing
heartbeat as this process stopped or hung as a whole, and an old loop time as the engine thread
stuck in a step (`RemoteEngine.health`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loraserve.config import EngineConfig
from loraserve.engine.contract import remote_calls
from loraserve.engine.request import ErrorEvent, Event, FinishEvent, RequestStream
from loraserve.errors import ConfigError, LoraserveError

log = logging.getLogger("loraserve.engine")

CALLS = remote_calls()
"""The engine methods the server process may call: the contract's remote ones, nothing else."""
CALL_THREADS = 4
"""Calls that block (adapter files read, a drain) run beside each other and never hold up
`submit`: a handful covers the registry, a metrics scrape and a drain at once."""


class EngineFault(Exception):
    """An unexpected error inside the engine process, carried over the pipe by type name and
    message (its traceback is logged there). Not a LoraserveError: the API maps it to INTERNAL."""


def portable(error: BaseException) -> BaseException:
    """`error` itself when it pickles as what it is (domain errors), else an EngineFault."""
    return error if isinstance(error, LoraserveError) else EngineFault(f"{type(error).__name__}: {error}")


class Outbox:
    """Messages to the server process, sent by one thread in bursts: the engine thread only
    enqueues, so a slow reader on the other side never stalls a decode step."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_loop, name="engine-outbox", daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(10)

    def _send_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            batch = [m for m in batch if m is not None]
            try:
                if batch:
                    self._conn.send(batch)
            except (OSError, ValueError):  # the server process is gone: nobody to tell
                return
            if done:
                return


class ForwardingStream(RequestStream):
    """A request's stream whose events go to the server process instead of a local reader."""

    def __init__(self, stream_id: int, request_id: str, outbox: Outbox, streams: dict) -> None:
        super().__init__(request_id)
        self._id = stream_id
        self._outbox = outbox
        self._streams = streams

    def push(self, event: Event) -> None:
        if isinstance(event, ErrorEvent):
            event = ErrorEvent(portable(event.error))
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self._streams.pop(self._id, None)
        self._outbox.put(("event", self._id, event))


def engine_threads(requested: int) -> int | None:
    """The torch CPU threads an engine process uses for `requested` (the engine_threads setting);
    None leaves torch's default. Auto (0): OMP_NUM_THREADS when the operator set it; torch's
    default on a CUDA host (the model runs on the GPU); otherwise every CPU but one. On CPU, a
    compute thread per core leaves the front end none, and OpenMP's spinning barriers then make
    both slow (measured with `bench tenants` on 2 CPUs: one thread gave tenant A 359 ms alone
    against 442 ms with two)."""
    import torch

    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus - 1)


@dataclass
class LaunchedEngine:
    """An engine process on its way up, and the server's end of its pipe."""

    process: multiprocessing.Process
    conn: object  # multiprocessing.connection.Connection

    def kill(self) -> None:
        """End the process if it still runs (the server failed before it could stop it in order)."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def launch(config: EngineConfig, threads: int = 0, heartbeat_interval: float = 1.0) -> LaunchedEngine:
    """Start an engine process loading `config`'s base (`threads`: the engine_threads setting).
    Light to import and quick to call, so `loraserve serve` starts it before importing its own
    gRPC, torch and transformers: both processes' imports then run side by side."""
    context = multiprocessing.get_context("spawn")  # CUDA and the grpc threads survive no fork
    conn, child = context.Pipe()
    process = context.Process(target=run_engine_process, name="loraserve-engine",
                              args=(child, config, logging.getLogger().getEffectiveLevel(), threads,
                                    heartbeat_interval))
    process.start()
    child.close()
    return LaunchedEngine(process, conn)


def run_engine_process(conn, config: EngineConfig, log_level: int, threads: int = 0,
                       heartbeat_interval: float = 1.0) -> None:
    """The engine process's main: load, say so, then serve messages until told to stop or the
    server process goes away (its end of the pipe closes), and exit."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = engine_threads(threads)
    if chosen is not None:
        import torch

        torch.set_num_threads(chosen)
    log.info("engine process %d: %s torch CPU threads", os.getpid(), chosen or "default")
    # Ctrl-C in a terminal and a closed terminal reach the whole process group; the server
    # process decides when the engine drains and stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    outbox = Outbox(conn)
    try:
        from loraserve.engine.native import NativeEngine

        engine = NativeEngine.load(config, on_own_thread=True)
    except BaseException as exc:  # the server process reports it and exits
        if isinstance(exc, ConfigError):  # a setting that cannot work: its message says which, no trace
            log.error("the engine failed to load: %s", exc)
        else:
            log.exception("the engine failed to load")
        outbox.put(("failed", portable(exc)))
        outbox.close()
        os._exit(1)
    outbox.put(("loaded", engine.base))
    engine.add_load_observer(lambda seconds: outbox.put(("adapter_load", seconds)))
    engine.set_idle_wait(min(0.5, heartbeat_interval))
    threading.Thread(target=_beat, args=(engine, outbox, heartbeat_interval), name="engine-heartbeat",
                     daemon=True).start()
    code = _serve(conn, engine, outbox)
    outbox.close()
    logging.shutdown()
    # Exit now: a call thread may still wait on a drain that no longer matters.
    os._exit(code)


def _beat(engine, outbox: Outbox, interval: float) -> None:
    """Send a heartbeat every `interval` seconds for as long as the process lives."""
    while True:
        outbox.put(("heartbeat", engine.heartbeat()))
        time.sleep(interval)


def _serve(conn, engine, outbox: Outbox) -> int:
    """The receive loop; the exit status (0 after "stop", 1 when the server process vanished)."""
    streams: dict[int, ForwardingStream] = {}
    calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="engine-call")
    stopped = threading.Event()

    def call(call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        try:
            outbox.put(("reply", call_id, True, getattr(engine, method)(*args, **kwargs)))
        except BaseException as exc:
            if not isinstance(exc, LoraserveError):
                log.exception("engine call %s failed", method)
            outbox.put(("reply", call_id, False, portable(exc)))
        if method == "stop":
            stopped.set()

    while not stopped.is_set():
        try:
            message = conn.recv()
        except (EOFError, OSError):
            log.error("the server process went away: stopping the engine")
            engine.stop()
            return 1
        kind = message[0]
        if kind == "submit":
            _, stream_id, request = message
            stream = ForwardingStream(stream_id, request.request_id, outbox, streams)
            streams[stream_id] = stream
            try:
                engine.submit(request, stream=stream)
            except BaseException as exc:  # validation: the request's own error, on its stream
                if not isinstance(exc, LoraserveError):
                    log.exception("submit failed")
                stream.push(ErrorEvent(exc))
        elif kind == "cancel":
            stream = streams.get(message[1])
            if stream is not None:
                engine.cancel(stream)
        elif kind == "call" and message[2] not in CALLS:  # answered, so the caller never waits forever
            outbox.put(("reply", message[1], False, EngineFault(f"{message[2]!r} is not an engine call")))
        elif kind == "call":
            _, call_id, method, args, kwargs = message
            calls.submit(call, call_id, method, args, kwargs)
            if method == "stop":
                stopped.wait()  # nothing else is taken once the engine stops
        else:
            log.error("unexpected message from the server process: %r", kind)
    return 0
