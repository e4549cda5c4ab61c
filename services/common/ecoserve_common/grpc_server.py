"""What every EcoServe gRPC server has besides its own service: standard health checking
(SERVING for "" and the service), server reflection, a bound port. Shared by the scheduler's
API and the predictor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def build_grpc_server(
    add_service: Callable[[grpc.Server], None],
    service_name: str,
    address: str,
    workers: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """(server, bound port), not yet started; OSError when the address cannot be bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), interceptors=list(interceptors)
    )
    add_service(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port
