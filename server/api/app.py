"""The server process: gRPC services, health, reflection, metrics, and a graceful drain.

Start-up: the gRPC and metrics ports are bound first (one taken stops the server at once, with
one line naming it), then the gRPC port answers with health NOT_SERVING while the base loads
(probes get an answer while a large model loads), inference answers UNAVAILABLE until the engine
has warmed up, then health turns SERVING. SIGTERM/SIGINT: health NOT_SERVING, new RPCs
UNAVAILABLE, running requests get `drain_timeout` seconds to finish, then the process exits 0.

Health (`loraserve.api.health`): `liveness` and `readiness`, kept apart, and a stopped or wedged
engine seen within three heartbeat intervals.

The engine (`--engine`, `loraserve.engine.choice`) runs outside this process: the native one in
a child process (`loraserve.engine.engine_process` says why), vLLM's engine core in vLLM's own;
this process holds the gRPC front end, access control, the adapter store and metrics. Should the
engine die, health turns NOT_SERVING, every open request fails UNAVAILABLE, and this process
exits 1 so that its orchestrator starts a fresh server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.access.keys import KeyFile
from loraserve.api.access import AccessControl
from loraserve.api.adapters import AdapterServicer
from loraserve.api.call_guard import CallGuard
from loraserve.api.health import HealthState, ServerHealth
from loraserve.api.inference import InferenceServicer
from loraserve.api.metrics import ServerMetrics
from loraserve.api.ports import PortInUse, check_port_free
from loraserve.api.process_memory import pin_mmap_threshold, trim
from loraserve.api.refusal_log import WINDOW_SECONDS as REFUSAL_WINDOW_SECONDS
from loraserve.api.server_info import ServerInfoServicer
from loraserve.api.status import log_refusal
from loraserve.api.status import mistakes as client_mistakes
from loraserve.engine.choice import EngineChoice, choose_engine
from loraserve.engine.contract import Engine
from loraserve.engine.engine_process import LaunchedEngine
from loraserve.engine.remote import RemoteEngine
from loraserve.proto.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    server_info_pb2,
    server_info_pb2_grpc,
)
from loraserve.registry.registry import AdapterRegistry
from loraserve.settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    server_info_pb2.DESCRIPTOR.services_by_name["ServerInfoService"].full_name,
)
INFERENCE_SERVICE, ADAPTER_SERVICE = SERVICE_NAMES[:2]
UPLOAD_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
"""Largest AdapterService message: an upload chunk of up to 4 MiB (the client sends 1 MiB) and its framing."""
MAX_SEND_BYTES = 64 * 1024 * 1024
MAX_RECEIVE_BYTES = 16 * 1024 * 1024
"""gRPC's own bound on any received message, behind CallGuard's per-service ones. A message under
it that a service does not take is refused by CallGuard in ~25 ms (a 14 MB prompt on loopback);
gRPC's own refusal of a larger one took ~120 ms for the same bytes (measured side by side)."""
TOKEN_BYTES_BOUND = 256
"""An upper bound of any tokenizer's longest token, for the receive limit set before the base is
loaded (the exact one, 128 bytes on DeepSeek's, applies to InferenceService once it is)."""
RECEIVE_WINDOW_BYTES = 1024 * 1024
KEYS_POLL_SECONDS = 2.0


def inference_request_bytes(max_input_bytes: int, max_input_tokens: int) -> int:
    """Largest InferenceService request: the longest input that can fit, each message's framing
    (a few bytes; at most max_input_tokens messages), and room for the sampling fields."""
    return max_input_bytes + 16 * max_input_tokens + 64 * 1024


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments.

    gRPC keeps a backlog of calls that arrived before the application took them, and past 1,000
    (soft, with random early drops) or 3,000 (hard) it cancels calls before any handler sees them:
    10,000 streams opened at once ended ~6,000 CANCELLED, uncounted, and a client cannot tell that
    from its own cancellation. The backlog is raised well above what can arrive at once (every
    call of eight full connections, and the server's own bound: measured, eight connections of
    2,048 streams each overflowed a backlog of 8,192 and 88 of 10,000 streams were CANCELLED), so
    calls reach `CallGuard`, which refuses the excess honestly (RESOURCE_EXHAUSTED) as fast as
    they come. Past that many streams at once gRPC still cancels: a bound, not a promise.

    What a client may send before the server reads it is fixed at 1 MiB per stream (HTTP/2 flow
    control, no window growth by BDP probing): three 300 MB uploads at once raised the front end's
    peak RSS by 67-98 MB with probing on and by 30 MB with this, in the same time on loopback (at
    10 ms round trip it still allows ~100 MB/s per upload)."""
    largest_prompt = inference_request_bytes(settings.max_input_tokens * TOKEN_BYTES_BOUND, settings.max_input_tokens)
    backlog = max(settings.max_concurrent_rpcs, 8 * settings.max_streams_per_connection)
    return [("grpc.max_receive_message_length", max(MAX_RECEIVE_BYTES, UPLOAD_MESSAGE_BYTES, largest_prompt)),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", 2 * backlog),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES)]


async def serve(settings: ServerSettings, launched: LaunchedEngine | None = None,
                choice: EngineChoice | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code. `choice`: the engine (by
    default what `settings.engine` means on this host); `launched`: the native engine's process,
    when the caller has already started it."""
    choice = choice or choose_engine(settings.engine)
    log.warning("engine: %s (%s)", choice.name, choice.reason)
    if choice.name == "native":
        lower_priority(settings.front_nice)  # its engine process, started before, keeps its own
    pin_mmap_threshold()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    keys = _load_keys(settings)  # before the model: a broken keys file fails in a second, not minutes
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, keys.reload)
    engine_gone = asyncio.Event()
    engine = _engine(settings, choice, launched, lambda: loop.call_soon_threadsafe(engine_gone.set))
    metrics = ServerMetrics(engine, vllm_series=choice.name == "vllm")
    guard = CallGuard(settings.max_concurrent_rpcs, {ADAPTER_SERVICE: UPLOAD_MESSAGE_BYTES},
                      on_refused=_refused(metrics))
    server = grpc.aio.server(interceptors=[guard], options=grpc_options(settings))
    health = ServerHealth()
    state = HealthState(health, SERVICE_NAMES)
    await state.update(live=True)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    registry = AdapterRegistry(engine, settings)
    access = AccessControl(keys, settings.allow_open_management, is_shared=registry.store.is_shared,
                           refusal_hold=settings.refusal_hold, max_held=settings.max_concurrent_rpcs // 2)
    metrics.track_held_refusals(access.held_refusals)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterServicer(registry, access, settings.max_concurrent_uploads, settings.max_concurrent_uploads_per_tenant),
        server)
    inference = InferenceServicer(engine, metrics, access, on_miss=registry.ensure)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    server_info_pb2_grpc.add_ServerInfoServiceServicer_to_server(ServerInfoServicer(engine, access, choice), server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health_pb2.DESCRIPTOR
                                         .services_by_name["Health"].full_name), server)
    try:
        port = _listen(server, settings)
        if settings.metrics_port:
            check_port_free("0.0.0.0", settings.metrics_port, "metrics port")
            metrics.serve_http(settings.metrics_port)
    except (PortInUse, OSError) as exc:
        log.error("cannot start: %s", exc.message if isinstance(exc, PortInUse) else exc)
        await asyncio.to_thread(engine.stop)
        return 1
    await server.start()
    log.warning("loraserve listening on port %d (health NOT_SERVING until the base is loaded and warmed up)", port)

    loading = asyncio.create_task(asyncio.to_thread(engine.wait_loaded))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not loading.done() or loading.exception() is not None:
        if loading.done():
            log.error("cannot start: the engine failed to load the base: %s", loading.exception())
        await server.stop(grace=0)
        await asyncio.to_thread(engine.stop)
        return 1 if loading.done() else 0
    if choice.name == "vllm":
        # Now that vLLM's processes run, at their own priority. Its client inside this process
        # (the engine loop thread running AsyncLLM and the threads vLLM started there) is engine
        # work too and keeps nice 0: measured, renicing it cost ~10% of adapter throughput.
        lower_priority(settings.front_nice, keep=engine.engine_threads())
    guard.request_bytes[INFERENCE_SERVICE] = inference_request_bytes(engine.input_limits.max_input_bytes,
                                                                     settings.max_input_tokens)
    engine.add_load_observer(metrics.adapter_load.observe)
    await asyncio.to_thread(engine.start)
    await asyncio.to_thread(registry.load_store, settings.preload, settings.pin)
    # Follow a store shared with other replicas and training jobs, and edits of the keys file
    # (Kubernetes Secret updates included) without a signal.
    pollers = [asyncio.create_task(_every(settings.store_sync_interval, registry.sync, "adapter store sync")),
               asyncio.create_task(_every(REFUSAL_WINDOW_SECONDS, _flush_logs(inference), "refusal log")),
               asyncio.create_task(_watch_engine(engine, state)),
               asyncio.create_task(_every(1.0, _trim_after_large(guard), "memory trim"))]
    if keys is not None:
        pollers.append(asyncio.create_task(_every(KEYS_POLL_SECONDS, keys.reload_if_changed, "keys file check")))
    state.accepting = True
    await state.update(live=engine.health() is None)
    log.warning("loraserve ready: %s (%s), %d adapters", engine.base.model_type, settings.quantization,
                len(engine.adapters()))

    await asyncio.wait([stopping, asyncio.create_task(engine_gone.wait())], return_when=asyncio.FIRST_COMPLETED)
    state.accepting = False
    for poller in pollers:
        poller.cancel()
    _flush_logs(inference)()
    if not stopping.done():
        stopping.cancel()
        log.error("the engine process is gone: health NOT_SERVING, stopping with exit status 1")
        await state.update(live=False)
        await server.stop(grace=1.0)
        await asyncio.to_thread(engine.stop)
        return 1
    log.warning("draining: health NOT_SERVING, new requests refused, up to %.0fs for running ones",
                settings.drain_timeout)
    await state.update(live=engine.health() is None)
    finished = await asyncio.to_thread(engine.drain, settings.drain_timeout)
    if not finished:
        log.warning("drain timeout: cancelling what is still running")
    await server.stop(grace=1.0)
    await asyncio.to_thread(engine.stop)
    return 0


def _engine(settings: ServerSettings, choice: EngineChoice, launched: LaunchedEngine | None,
            on_exit) -> Engine:
    """The chosen engine, not loaded yet (`wait_loaded` loads it); `on_exit` is called if it dies."""
    if choice.name == "vllm":
        from loraserve.engine.vllm_engine import VllmEngine

        return VllmEngine(settings.engine_config(), settings.vllm_options(), on_exit,
                          heartbeat_interval=settings.heartbeat_interval, stall_timeout=settings.engine_stall_timeout)
    return RemoteEngine(settings.engine_config(), on_exit, settings.engine_threads, launched,
                        heartbeat_interval=settings.heartbeat_interval, stall_timeout=settings.engine_stall_timeout)


def _listen(server: grpc.aio.Server, settings: ServerSettings) -> int:
    """Bind the gRPC port (PortInUse, naming it, when taken); the port bound."""
    check_port_free(settings.host, settings.port, "gRPC port")
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert:
            from loraserve.access.tls import server_credentials

            credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:  # taken between the check and the bind
        raise PortInUse(f"gRPC port {settings.port} on {settings.host} could not be bound (in use?)") from None


def _refused(metrics: ServerMetrics):
    """What CallGuard does with a call it refused before its servicer ran: count it (adapter and
    tenant unknown yet) and log its one line."""
    def refused(method: str, code: str, message: str) -> None:
        metrics.requests.labels(adapter="", tenant="", code=code).inc()
        log_refusal(method.rsplit("/", 1)[-1], code, message)
    return refused


def _trim_after_large(guard: CallGuard):
    """Give the memory of large messages back (see `loraserve.api.process_memory`)."""
    def trim_if_needed() -> None:
        if guard.large_message_seen:
            guard.large_message_seen = False
            trim()
    return trim_if_needed


def _flush_logs(inference: InferenceServicer):
    def flush() -> None:
        inference.refusals.flush()
        client_mistakes.flush()
    return flush


async def _watch_engine(engine: Engine, state: HealthState) -> None:
    """Follow the engine's health: NOT_SERVING (liveness and readiness) while it is stopped,
    hung or stuck in a step, SERVING again if it recovers; every change logged once."""
    problem: str | None = None
    while True:
        now = engine.health()
        if now is not None and problem is None:
            log.error("engine unhealthy, health NOT_SERVING: %s", now)
        elif now is None and problem is not None:
            log.warning("engine healthy again (%s no longer holds): health follows readiness", problem)
        problem = now
        await state.update(live=problem is None)
        await asyncio.sleep(engine.heartbeat_interval / 4)


async def _every(seconds: float, work, what: str) -> None:
    """Run `work` on a worker thread every `seconds` (0: never) until cancelled; a failure
    (a transient disk error, say) is logged and the next round runs as planned."""
    if seconds <= 0:
        return
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception("%s failed; retrying in %.0fs", what, seconds)


def lower_priority(increment: int, keep: set[int] = frozenset()) -> None:
    """Add `increment` to the nice value of every thread of this process but those in `keep`
    (native thread ids); threads started later inherit it from their creator. The engine
    process, started before, keeps its own. (On Linux nice is per thread, so os.nice() alone
    would reach only the calling thread.)"""
    if increment <= 0:
        return
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        os.nice(increment)
        return
    for tid in (int(t) for t in os.listdir(tasks) if int(t) not in keep):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    log.info("front end at nice +%d: the engine goes first when CPUs are short", increment)


def _load_keys(settings: ServerSettings) -> KeyFile | None:
    if not settings.api_keys_file:
        where = "any peer" if settings.allow_open_management else "loopback peers only"
        log.warning("NO API KEYS: this server runs OPEN. Anyone who reaches port %d may generate with any "
                    "adapter; adapter management is accepted from %s. Set --api-keys-file to require keys.",
                    settings.port, where)
        return None
    keys = KeyFile(settings.api_keys_file)
    log.warning("API keys required: %d keys, %d tenants (reloaded on SIGHUP or when the file changes)",
                len(keys.ring), len(keys.ring.tenants))
    return keys


def run(settings: ServerSettings, launched: LaunchedEngine | None = None, choice: EngineChoice | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings, launched, choice))
