"""The gRPC listener: its server in the gateway's event loop, its start and its drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from gateway.grpcproxy.handler import Proxy, ProxyHandler
from gateway.grpcproxy.health import Health, Readiness
from gateway.grpcproxy.tls import ServerCredentials
from gateway.grpcproxy.upstream import UpstreamChannel
from gateway.pipeline import Pipeline
from gateway.policy.sections import GrpcConfig
from gateway.telemetry.tracing import Tracing

log = logging.getLogger("gateway.grpc")


def server_options(cfg: GrpcConfig, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """Options of the listener; ``reuse_port`` for processes meant to share the port."""
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # grpc turns SO_REUSEPORT on by default: a second process could then share the port
        # silently (and take half of the calls); a sidecar wants a clear "address in use",
        # unless it runs several worker processes on purpose.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


class GrpcListener:
    """The gRPC side of one gateway process (``grpc`` section; restart to change it)."""

    def __init__(
        self,
        cfg: GrpcConfig,
        current: Callable[[], Pipeline],
        readiness: Readiness,
        tracing: Tracing | None,
        access_log: bool,
        drain: float,
        reuse_port: bool = False,
    ) -> None:
        self.cfg = cfg
        self.upstream = UpstreamChannel(cfg, drain)
        self.proxy = Proxy(cfg, current, self.upstream, tracing, access_log)
        self.health = Health(readiness)
        self.server_certs = (
            ServerCredentials(cfg.tls, cfg.tls_reload_interval) if cfg.tls is not None else None
        )
        self.server = grpc.aio.server(options=server_options(cfg, reuse_port))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((ProxyHandler(self.proxy),))
        try:
            if self.server_certs is not None:
                creds = self.server_certs.credentials()
                self.port = self.server.add_secure_port(cfg.listen, creds)
            else:
                self.port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError:
            # grpc's text points at GRPC_VERBOSITY; the cause is nearly always a port in use.
            raise ValueError(f"grpc.listen: cannot listen on {cfg.listen} (in use?)") from None
        self._watch: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen; RuntimeError when the address cannot be bound."""
        await self.server.start()
        if self.cfg.upstream_tls is not None:
            interval = self.cfg.tls_reload_interval
            self._watch = asyncio.get_running_loop().create_task(self.upstream.watch(interval))
        log.info(
            "grpc listener started",
            extra={
                "listen": self.cfg.listen,
                "upstream": self.cfg.upstream,
                "tls": self.cfg.tls is not None,
                "mtls": self.cfg.tls is not None and self.cfg.tls.client_ca is not None,
                "upstream_tls": self.cfg.upstream_tls is not None,
            },
        )

    async def upstream_check(self) -> str | None:
        """Readiness check: None when the gRPC upstream is connected or connects."""
        return None if await self.upstream.ready() else "unreachable"

    def drain(self, grace: float) -> None:
        """Stop taking calls and let those in flight finish for ``grace`` seconds (once)."""
        if self._stopping is None:
            self.health.invalidate(closing=True)
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace))

    async def _stop(self, grace: float) -> None:
        log.info("grpc listener draining", extra={"calls": self.proxy.inflight})
        await self.server.stop(grace)
        if self._watch is not None:
            self._watch.cancel()
        await self.upstream.close(None)

    async def stopped(self) -> None:
        """Wait for the drain (starting it now, without grace, if nobody did)."""
        self.drain(0)
        assert self._stopping is not None
        await self._stopping


async def start_grpc(
    cfg: GrpcConfig,
    current: Callable[[], Pipeline],
    readiness: Readiness,
    tracing: Tracing | None,
    access_log: bool,
    drain: float,
    reuse_port: bool = False,
) -> GrpcListener:
    """A started gRPC listener; ValueError when it cannot listen or its certificates are bad.
    ``reuse_port``: bind with SO_REUSEPORT, for worker processes sharing the port."""
    listener = GrpcListener(cfg, current, readiness, tracing, access_log, drain, reuse_port)
    if listener.port == 0:
        raise ValueError(f"grpc.listen: cannot listen on {cfg.listen} (in use?)")
    await listener.start()
    return listener
