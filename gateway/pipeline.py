"""The fixed phases of a request and the pipeline built from one policy.

The phase order is the security model: a policy chooses what each phase does and on which
routes, never the order. Stages plug in through ``gateway.stages.FACTORIES``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gateway.clientip import ClientIpResolver
from gateway.context import RequestContext
from gateway.errors import Deny, Headers
from gateway.policy.schema import Policy
from gateway.routes import OTHER, CompiledRoute, Router
from gateway.telemetry.recorder import Recorder
from gateway.upstream import Upstream

if TYPE_CHECKING:
    from gateway.telemetry.tracing import Tracing

log = logging.getLogger("gateway.pipeline")
T = TypeVar("T")


class Phase(IntEnum):
    """Where a stage runs. Lower runs first; request id and route match always come before."""

    IP_RULES = 10
    AUTH = 20
    RATE_LIMIT = 30
    INPUT_GUARD = 50
    OUTPUT_GUARD = 70
    USAGE = 80


class RequestStage(Protocol):
    """A stage that may stop a request before it goes upstream."""

    name: str
    phase: Phase
    needs_body: bool
    """True when the stage reads ``ctx.body`` (the body is then buffered, bounded)."""

    async def on_request(self, ctx: RequestContext) -> Deny | None:
        """Return a Deny to stop the request, None to let it go on.

        A stage may also have ``prepare(ctx)``: pure work (no outcome, no side effect) that
        it may do ahead of its turn while an earlier stage of the same list waits on the
        network (the rate limit's store round trip), leaving the result in
        ``ctx.ahead[stage.name]`` for its own ``on_request`` to use. It is skipped once the
        list has run, so a request denied before its turn costs it nothing."""
        ...


@dataclass(slots=True)
class ResponseHead:
    """Status and headers of the answer, still changeable by a buffering filter."""

    status: int
    headers: Headers


class BodyFilter(Protocol):
    """Sees an answer's body. With ``buffer`` the whole body comes in one ``on_chunk`` call
    before the head is sent, so the filter may change ``head``; otherwise chunks stream.
    A streaming filter may also have a ``finished`` attribute: once it is true, the gateway
    stops reading the upstream, drops that connection and ends the answer with ``on_end``."""

    buffer: bool

    async def on_chunk(self, chunk: bytes) -> bytes:
        """Return what to send in place of ``chunk``."""
        ...

    async def on_end(self) -> bytes:
        """Return what to send after the last chunk (e.g. a held-back tail)."""
        ...


class ResponseStage(Protocol):
    """A stage that sees the upstream's answer."""

    name: str
    phase: Phase

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> BodyFilter | None:
        """Inspect or change the head; return a filter to see the body, or None."""
        ...


Stage = RequestStage | ResponseStage
ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, or a short reason (``"state store unreachable"``)."""


@dataclass
class BuildContext:
    """What stage factories get besides the route: the policy and shared resources."""

    policy: Policy
    shared: dict[str, Any] = field(default_factory=dict)
    """Resources shared by routes (a JWKS fetcher, a store), keyed by the factory."""
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    strip_headers: set[bytes] = field(default_factory=set)
    """Request headers never forwarded from the client (e.g. identity headers)."""

    def share(self, key: str, make: Callable[[], T]) -> T:
        """One instance per ``key`` for the whole pipeline, so routes whose sections are
        equal share one stage (and its compiled rules, caches, connections)."""
        if key not in self.shared:
            self.shared[key] = make()
        found: T = self.shared[key]
        return found


StageFactory = Callable[[CompiledRoute, BuildContext], list[Any]]


class Pipeline:
    """Everything derived from one policy load. Swapped whole on reload."""

    def __init__(self, policy: Policy, factories: tuple[StageFactory, ...]) -> None:
        self.policy = policy
        self.build = BuildContext(policy)
        routes = [
            _compile(
                r.name,
                r.path,
                frozenset(r.methods) if r.methods else None,
                r.layer,
                r.auth or policy.auth,
                r.rate_limits or policy.rate_limits,
                r.guardrails or policy.guardrails,
            )
            for r in policy.routes
        ]
        fallback = _compile(
            OTHER, "/", None, None, policy.auth, policy.rate_limits, policy.guardrails
        )
        for route in [*routes, fallback]:
            for factory in factories:
                for stage in factory(route, self.build):
                    _attach(route, stage)
            _order(route)
        self.router = Router(routes, fallback)
        self.upstream = Upstream(policy.upstream)
        trusted = policy.rate_limits.trusted_proxies if policy.rate_limits else []
        self.client_ip = ClientIpResolver(trusted)
        self.strip_headers = frozenset(self.build.strip_headers)
        self.recorder = Recorder(policy)
        self.max_body = policy.max_body_bytes
        self.max_headers = policy.max_header_bytes
        self.inflight = 0
        self.retired = False

    async def start(self) -> None:
        """Run the stages' start-up work (key fetches, store connections)."""
        for hook in self.build.on_start:
            await hook()

    async def close(self) -> None:
        """Release the upstream pool and the stages' resources."""
        await self.upstream.close()
        for hook in self.build.on_close:
            try:
                await hook()
            except Exception:
                log.exception("closing a stage failed")

    async def readiness(self) -> list[str]:
        """Reasons this pipeline is not ready; empty when ready."""
        failing = []
        if not await self.upstream.reachable():
            failing.append("upstream")
        for name, check in self.build.readiness.items():
            reason = await check()
            if reason is not None:
                failing.append(f"{name}: {reason}")
        return failing


def _compile(
    name: str,
    prefix: str,
    methods: frozenset[str] | None,
    layer: str | None,
    auth: Any,
    rate_limits: Any,
    guardrails: Any,
) -> CompiledRoute:
    return CompiledRoute(name, prefix, methods, layer, auth, rate_limits, guardrails)


def _attach(route: CompiledRoute, stage: Any) -> None:
    if hasattr(stage, "on_request"):
        (route.after_body if stage.needs_body else route.before_body).append(stage)
        route.needs_body = route.needs_body or stage.needs_body
    if hasattr(stage, "on_response"):
        route.response.append(stage)
    if hasattr(stage, "on_finish"):
        route.finishers.append(stage)


def _order(route: CompiledRoute) -> None:
    route.before_body.sort(key=lambda s: s.phase)
    route.after_body.sort(key=lambda s: s.phase)
    route.response.sort(key=lambda s: s.phase)
    route.before_ahead = [s for s in route.before_body[1:] if hasattr(s, "prepare")]
    route.after_ahead = [s for s in route.after_body[1:] if hasattr(s, "prepare")]


def _prepare(stages: list[Any], ctx: RequestContext) -> None:
    if ctx.ahead is None:
        return  # the stages have run already (none of them waited)
    for stage in stages:
        try:
            stage.prepare(ctx)
        except Exception:  # the stage's own turn does the work again and reports
            log.debug("preparing %s failed", stage.name, exc_info=True)


async def run_stages(
    stages: list[RequestStage],
    ctx: RequestContext,
    tracing: Tracing | None,
    ahead: list[Any] | None = None,
) -> Deny | None:
    """Run ``stages`` in order until one denies (each in a child span when traced with
    ``stage_spans``); the denying stage's name goes to ``ctx.notes["denied_by"]``.

    ``ahead``: the later stages' ``prepare`` hooks, run in a callback queued two loop turns
    out, that is behind the writes the first stages queue now: while they wait for the
    answer (measured: ``python -m bench.speed``, the README's Speed section)."""
    if ahead:
        ctx.ahead = {}
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, _prepare, ahead, ctx)
        try:
            return await _run_stages(stages, ctx, tracing)
        finally:
            ctx.ahead = None
    return await _run_stages(stages, ctx, tracing)


async def _run_stages(
    stages: list[RequestStage], ctx: RequestContext, tracing: Tracing | None
) -> Deny | None:
    span = ctx.span
    traced = (
        tracing is not None and tracing.stage_spans and span is not None and span.is_recording()
    )
    for stage in stages:
        if traced:
            assert tracing is not None and span is not None
            child = tracing.start_child(stage.name, span)
            try:
                deny = await stage.on_request(ctx)
            finally:
                child.end()
        else:
            deny = await stage.on_request(ctx)
        if deny is not None:
            ctx.notes["denied_by"] = stage.name
            return deny
    return None
