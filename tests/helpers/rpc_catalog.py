"""Every RPC a loraserve server answers, from the protos' descriptors, and a way to call any of
them with raw bytes (so a test can send what no generated stub would)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from loraserve.proto.v1 import adapters_pb2, inference_pb2, server_info_pb2

FILES = (inference_pb2, adapters_pb2, server_info_pb2, health_pb2, reflection_pb2)


@dataclass(frozen=True)
class Rpc:
    path: str
    """'/package.Service/Method'."""
    client_streaming: bool
    server_streaming: bool
    request: type
    """The request message class."""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def all_rpcs() -> list[Rpc]:
    out = []
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append(Rpc(f"/{service.full_name}/{method.name}", method.client_streaming,
                               method.server_streaming, message_factory.GetMessageClass(method.input_type)))
    return out


def call_raw(channel: grpc.Channel, rpc: Rpc, payloads: list[bytes], timeout: float = 60,
             metadata=()) -> list[bytes]:
    """Send `payloads` (one for a unary request) as they are; the raw response messages."""
    if rpc.client_streaming and rpc.server_streaming:
        return list(channel.stream_stream(rpc.path)(iter(payloads), timeout=timeout, metadata=metadata))
    if rpc.client_streaming:
        return [channel.stream_unary(rpc.path)(iter(payloads), timeout=timeout, metadata=metadata)]
    if rpc.server_streaming:
        return list(channel.unary_stream(rpc.path)(payloads[0], timeout=timeout, metadata=metadata))
    return [channel.unary_unary(rpc.path)(payloads[0], timeout=timeout, metadata=metadata)]
