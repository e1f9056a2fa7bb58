"""ServerInfoService: what is served and its limits. Never reveals server paths."""

from __future__ import annotations

import grpc

from loraserve import __version__
from loraserve.api.access import AccessControl
from loraserve.api.status import abort
from loraserve.engine.choice import EngineChoice
from loraserve.engine.contract import Engine
from loraserve.errors import LoraserveError, Unavailable
from loraserve.proto.v1 import server_info_pb2 as pb
from loraserve.proto.v1 import server_info_pb2_grpc


class ServerInfoServicer(server_info_pb2_grpc.ServerInfoServiceServicer):
    def __init__(self, engine: Engine, access: AccessControl, choice: EngineChoice) -> None:
        self._engine = engine
        self._access = access
        self._choice = choice

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        try:
            if not self._engine.loaded:
                raise Unavailable("the server is still loading its base model; retry shortly")
            self._access.caller(context.invocation_metadata(), context.peer(), "generate")
        except LoraserveError as exc:
            await abort(context, exc, call="GetServerInfo")
        c = self._engine.config
        name = c.base.public_name
        return pb.GetServerInfoResponse(
            base_model=name, base_fingerprint=self._engine.base.fingerprint, quantization=self._engine.base.quantization,
            architecture=self._engine.base.model_type, version=__version__, engine=self._choice.name,
            engine_reason=self._choice.reason,
            limits=pb.Limits(max_lora_rank=c.max_lora_rank, max_loras=c.max_loras, max_cpu_loras=c.max_cpu_loras,
                             max_batch_size=c.max_batch_size, max_queue=c.max_queue,
                             max_input_tokens=c.max_input_tokens, max_new_tokens=c.max_new_tokens_limit,
                             max_input_bytes=self._engine.input_limits.max_input_bytes))
