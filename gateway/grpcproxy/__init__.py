"""The gRPC side of the proxy (``grpc`` policy section): see ``docs/grpc.md``.

``start_grpc`` runs a grpc.aio server in the gateway's event loop that proxies every method
of the upstream as raw bytes (``handler``) behind the same identity and limit stages as HTTP
(``policy``), with mutual TLS and certificate rotation (``tls``, ``upstream``), the standard
health service from the gateway's readiness (``health``) and per-method metrics (``metrics``).
"""

from gateway.grpcproxy.listener import GrpcListener, start_grpc

__all__ = ["GrpcListener", "start_grpc"]
