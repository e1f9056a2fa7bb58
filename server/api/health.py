"""The gRPC health service and what its statuses say.

Two questions, asked through the health service's names: `liveness` (is the engine alive and
making progress: its heartbeats arrive and its steps end; also while loading and draining) and
`readiness` (that, and warmed up and not draining; "" and each loraserve service name answer the
same). A stopped or wedged engine turns both NOT_SERVING within three heartbeat intervals
(`RemoteEngine.health`), so an orchestrator restarts the server instead of sending it requests
that would wait forever; a draining server only stops being ready.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

LIVENESS, READINESS = "liveness", "readiness"


class ServerHealth(HealthServicer):
    """grpcio-health-checking's asyncio servicer, and the `List` call it leaves unimplemented
    (which would answer UNIMPLEMENTED with a Python exception name)."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}

    async def set(self, service: str, status: int) -> None:
        self._statuses[service] = status
        await super().set(service, status)

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()})


class HealthState:
    """The statuses, derived from two facts: whether the server accepts requests (warmed up and
    not draining) and whether its engine is alive."""

    def __init__(self, health: ServerHealth, service_names: tuple[str, ...]) -> None:
        self._health = health
        self._service_names = service_names
        self.accepting = False
        self._live: bool | None = None
        self._ready: bool | None = None

    async def update(self, live: bool) -> None:
        ready = live and self.accepting
        if live != self._live:
            await self._health.set(LIVENESS, _status(live))
            self._live = live
        if ready != self._ready:
            for name in ("", READINESS, *self._service_names):
                await self._health.set(name, _status(ready))
            self._ready = ready


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
