"""Run the gateway: the proxy and admin listeners in one event loop, reload, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from gateway import heap
from gateway.admin import AdminApp
from gateway.app import GatewayApp
from gateway.asgi import ASGIApp
from gateway.httpproto import ConnectionLimits, limits_of, protocol_class
from gateway.pipeline import Pipeline
from gateway.policy import load_policy
from gateway.policy.schema import Policy
from gateway.policy.types import split_hostport
from gateway.reload import Reloader
from gateway.stages import FACTORIES
from gateway.telemetry import metrics
from gateway.telemetry.logging import setup_logging
from gateway.telemetry.request_metrics import ACTIVE_CONNECTIONS
from gateway.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from gateway.grpcproxy import GrpcListener

log = logging.getLogger("gateway.server")

#: The admin listener serves probes and scrapes only: a few connections, fast heads.
ADMIN_LIMITS = ConnectionLimits(max_connections=256, header_read_timeout=5.0)


@dataclass(frozen=True)
class Overrides:
    """Command-line values that win over the policy file (also on every reload)."""

    listen: str | None = None
    admin_listen: str | None = None
    upstream: str | None = None

    def apply(self, policy: Policy) -> Policy:
        """The policy with these overrides (validated by the command line)."""
        update: dict[str, Any] = {}
        if self.listen:
            update["listen"] = self.listen
        if self.admin_listen:
            update["admin_listen"] = self.admin_listen
        if self.upstream:
            update["upstream"] = policy.upstream.model_copy(update={"url": self.upstream})
        return policy.model_copy(update=update) if update else policy


def build_pipeline(policy: Policy) -> Pipeline:
    """The pipeline for ``policy`` with every registered stage factory."""
    return Pipeline(policy, FACTORIES)


class _Server(uvicorn.Server):
    """A uvicorn server whose signals are handled by us (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(
    app: ASGIApp,
    listen: str,
    limits: Callable[[], ConnectionLimits] = ConnectionLimits,
    **extra: Any,
) -> uvicorn.Config:
    """uvicorn settings for a sidecar: no proxy-header trust, no server banner, our logs,
    our HTTP protocol (JSON errors, connection bounds and read timeouts from ``limits``)."""
    host, port = split_hostport(listen)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits),
        ws="none",
        lifespan="off",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        **extra,
    )


async def _start_grpc(
    policy: Policy, app: GatewayApp, admin: AdminApp, tracing: Tracing, worker: bool
) -> GrpcListener | None:
    """The gRPC listener when the policy has a ``grpc`` section (see ``gateway.grpcproxy``)."""
    if policy.grpc is None:
        return None
    from gateway.grpcproxy import start_grpc  # grpcio loads only when gRPC is on

    listener = await start_grpc(
        policy.grpc,
        lambda: app.pipeline,
        admin.failing,
        tracing,
        policy.telemetry.access_log,
        policy.drain_timeout,
        reuse_port=worker,
    )
    admin.checks["grpc.upstream"] = listener.upstream_check
    return listener


def reuse_port_socket(listen: str) -> socket.socket:
    """A listening socket bound with SO_REUSEPORT: each worker binds its own on the same port
    and the kernel spreads new connections evenly among them."""
    host, port = split_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _sample_gauges() -> None:
    while True:
        metrics.sample_observed()
        await asyncio.sleep(1.0)


async def serve(path: Path, overrides: Overrides = Overrides(), worker: bool = False) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. ``worker``: one of several
    processes of ``gateway run --workers N`` (listeners shared with SO_REUSEPORT)."""
    policy = overrides.apply(load_policy(path))
    setup_logging(policy.telemetry.log_level)

    def build(p: Policy) -> Pipeline:
        return build_pipeline(overrides.apply(p))

    pipeline = build_pipeline(policy)
    await pipeline.start()
    metrics.POLICY_INFO.set_to_current_time()
    tracing = Tracing(policy.telemetry)
    app = GatewayApp(pipeline, tracing)
    admin = AdminApp(lambda: app.pipeline)
    main = _Server(
        uvicorn_config(
            app,
            policy.listen,
            lambda: limits_of(app.pipeline.policy),  # each connection reads the live policy
            timeout_graceful_shutdown=policy.drain_timeout,
        )
    )
    admin_srv = _Server(uvicorn_config(admin, policy.admin_listen, lambda: ADMIN_LIMITS))
    reloader = Reloader(path, app, build)
    # Read at scrape time (or sampled each second with workers), not updated per request.
    connections = ACTIVE_CONNECTIONS.labels(policy.telemetry.service_name)
    metrics.observe(connections, lambda: len(main.server_state.connections))
    metrics.observe(metrics.IN_FLIGHT, lambda: app.inflight)

    grpc = await _start_grpc(policy, app, admin, tracing, worker)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not main.should_exit:
            log.info("draining", extra={"grace_seconds": app.pipeline.policy.drain_timeout})
        admin.draining = True
        main.should_exit = True
        if grpc is not None:
            grpc.drain(app.pipeline.policy.drain_timeout)

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: loop.create_task(reloader.reload(reason="SIGHUP"))
    )
    watcher = loop.create_task(reloader.watch())
    sampler = loop.create_task(_sample_gauges()) if metrics.MULTIPROCESS else None
    sockets: dict[str, list[socket.socket] | None] = {"main": None, "admin": None}
    if worker:
        sockets = {
            "main": [reuse_port_socket(policy.listen)],
            "admin": [reuse_port_socket(policy.admin_listen)],
        }
    admin_task = loop.create_task(admin_srv.serve(sockets=sockets["admin"]))
    log.info(
        "gateway started",
        extra={
            "listen": policy.listen,
            "admin": policy.admin_listen,
            "upstream": policy.upstream.url,
        },
    )
    heap.freeze()  # everything built so far lives as long as the process
    try:
        await main.serve(sockets=sockets["main"])
    finally:
        if grpc is not None:
            await grpc.stopped()
        watcher.cancel()
        if sampler is not None:
            sampler.cancel()
        admin_srv.should_exit = True
        await admin_task
        await app.pipeline.close()
        metrics.flush()  # the last requests' metric updates: a worker's file outlives it
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
    log.info("gateway stopped")
    return 0
