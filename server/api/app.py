"""The server process: gRPC services, health, reflection, metrics, and a graceful drain.

Start-up: the gRPC port opens at once with health NOT_SERVING (probes get an answer while a
large model loads), inference answers UNAVAILABLE until the engine has warmed up, then health
turns SERVING. SIGTERM/SIGINT: health NOT_SERVING, new RPCs UNAVAILABLE, running requests get
`drain_timeout` seconds to finish, then the process exits 0.

The engine runs in a child process (`server.engine.engine_process` says why); this process holds
the gRPC front end, access control, the adapter store and metrics. Should the engine process
die, health turns NOT_SERVING, every open request fails UNAVAILABLE, and this process exits 1
so that its orchestrator starts a fresh server.
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
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from server.access.keys import KeyFile
from server.api.access import AccessControl
from server.api.adapters import AdapterServicer
from server.api.gen.loraserve.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    server_info_pb2,
    server_info_pb2_grpc,
)
from server.api.inference import InferenceServicer
from server.api.metrics import ServerMetrics
from server.api.refusal_log import WINDOW_SECONDS as REFUSAL_WINDOW_SECONDS
from server.api.server_info import ServerInfoServicer
from server.engine.engine_client import EngineClient
from server.engine.engine_process import LaunchedEngine
from server.engine.registry import AdapterRegistry
from server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    server_info_pb2.DESCRIPTOR.services_by_name["ServerInfoService"].full_name,
)
# Uploads arrive in chunks, but one message may still carry a few MB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KEYS_POLL_SECONDS = 2.0


async def _set_health(health: HealthServicer, status: int) -> None:
    for name in ("", *SERVICE_NAMES):
        await health.set(name, status)


async def serve(settings: ServerSettings, launched: LaunchedEngine | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code. `launched`: its engine process,
    when the caller has already started it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    keys = _load_keys(settings)  # before the model: a broken keys file fails in a second, not minutes
    if keys is not None:
        loop.add_signal_handler(signal.SIGHUP, keys.reload)
    engine_gone = asyncio.Event()
    engine = await asyncio.to_thread(EngineClient.load, settings.engine_config(),
                                     lambda: loop.call_soon_threadsafe(engine_gone.set), settings.engine_threads,
                                     launched)
    lower_priority(settings.front_nice)
    metrics = ServerMetrics(engine)
    engine.add_load_observer(metrics.adapter_load.observe)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    health = HealthServicer()
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    registry = AdapterRegistry(engine, settings)
    access = AccessControl(keys, settings.allow_open_management, is_shared=registry.store.is_shared,
                           refusal_hold=settings.refusal_hold)
    metrics.track_held_refusals(access.held_refusals)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(registry, access), server)
    inference = InferenceServicer(engine, metrics, access, on_miss=registry.ensure)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    server_info_pb2_grpc.add_ServerInfoServiceServicer_to_server(ServerInfoServicer(engine, access), server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health_pb2.DESCRIPTOR
                                         .services_by_name["Health"].full_name), server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert:
        from server.access.tls import server_credentials

        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    log.warning("loraserve listening on port %d (health NOT_SERVING until warmed up)", port)
    if settings.metrics_port:
        metrics.serve_http(settings.metrics_port)

    await asyncio.to_thread(engine.start)
    await asyncio.to_thread(registry.load_store, settings.preload, settings.pin)
    # Follow a store shared with other replicas and training jobs, and edits of the keys file
    # (Kubernetes Secret updates included) without a signal.
    pollers = [asyncio.create_task(_every(settings.store_sync_interval, registry.sync, "adapter store sync")),
               asyncio.create_task(_every(REFUSAL_WINDOW_SECONDS, inference.refusals.flush, "refusal log"))]
    if keys is not None:
        pollers.append(asyncio.create_task(_every(KEYS_POLL_SECONDS, keys.reload_if_changed, "keys file check")))
    await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
    log.warning("loraserve ready: %s (%s), %d adapters", engine.base.model_type, settings.quantization,
                len(engine.adapters()))

    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, asyncio.create_task(engine_gone.wait())], return_when=asyncio.FIRST_COMPLETED)
    for poller in pollers:
        poller.cancel()
    inference.refusals.flush()
    if not stopping.done():
        stopping.cancel()
        log.error("the engine process is gone: health NOT_SERVING, stopping with exit status 1")
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=1.0)
        await asyncio.to_thread(engine.stop)
        return 1
    log.warning("draining: health NOT_SERVING, new requests refused, up to %.0fs for running ones",
                settings.drain_timeout)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    finished = await asyncio.to_thread(engine.drain, settings.drain_timeout)
    if not finished:
        log.warning("drain timeout: cancelling what is still running")
    await server.stop(grace=1.0)
    await asyncio.to_thread(engine.stop)
    return 0


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


def lower_priority(increment: int) -> None:
    """Add `increment` to the nice value of every thread of this process; threads started later
    inherit it from their creator. The engine process, started before, keeps its own. (On Linux
    nice is per thread, so os.nice() alone would reach only the calling thread.)"""
    if increment <= 0:
        return
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        os.nice(increment)
        return
    for tid in (int(t) for t in os.listdir(tasks)):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    log.info("front end at nice +%d: the engine process goes first when CPUs are short", increment)


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


def run(settings: ServerSettings, launched: LaunchedEngine | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings, launched))
