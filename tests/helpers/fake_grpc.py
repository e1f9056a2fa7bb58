"""A real in-process gRPC server on 127.0.0.1 carrying test servicers, for client-side tests
that need to control exactly what the server answers."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraserve.proto.v1 import adapters_pb2_grpc, inference_pb2_grpc, server_info_pb2_grpc


@contextmanager
def fake_server(inference: inference_pb2_grpc.InferenceServiceServicer,
                adapters: adapters_pb2_grpc.AdapterServiceServicer,
                info: server_info_pb2_grpc.ServerInfoServiceServicer | None = None,
                interceptors: tuple[grpc.ServerInterceptor, ...] = ()) -> Iterator[str]:
    """Serve the given servicers (and a SERVING health service); yields the target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(adapters, server)
    if info is not None:
        server_info_pb2_grpc.add_ServerInfoServiceServicer_to_server(info, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
