"""Route matching, compiled once per policy load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.policy.sections import AuthConfig, GuardrailsConfig, RateLimitConfig

if TYPE_CHECKING:
    from gateway.pipeline import RequestStage, ResponseStage

#: Name of the route used for paths that no route matches (and the metrics label for them).
OTHER = "other"


@dataclass(slots=True)
class CompiledRoute:
    """A route with its effective sections and the stages built for it."""

    name: str
    prefix: str
    methods: frozenset[str] | None
    layer: str | None
    auth: AuthConfig | None
    rate_limits: RateLimitConfig | None
    guardrails: GuardrailsConfig | None
    before_body: list[RequestStage] = field(default_factory=list)
    """Stages that decide on headers alone (auth, limits), in phase order."""
    after_body: list[RequestStage] = field(default_factory=list)
    """Stages that read the body (input guardrails), in phase order."""
    response: list[ResponseStage] = field(default_factory=list)
    """Stages that see the answer (output guardrails, usage), in phase order."""
    finishers: list[Any] = field(default_factory=list)
    """Stages with ``on_finish(ctx)``: called once when the request ends, however it ends."""
    needs_body: bool = False
    before_ahead: list[Any] = field(default_factory=list)
    """Stages of ``before_body``, after its first, with ``prepare(ctx)``: work they may do
    ahead of their turn while an earlier stage waits on the network."""
    after_ahead: list[Any] = field(default_factory=list)
    """The same for ``after_body``."""

    def matches(self, method: str, path: str) -> bool:
        """True when ``path`` is the prefix or below it, and the method is allowed."""
        prefix = self.prefix
        if prefix != "/" and path != prefix:
            if not path.startswith(prefix):
                return False
            if not prefix.endswith("/") and path[len(prefix)] != "/":
                return False
        elif prefix == "/" and not path.startswith("/"):
            return False
        return self.methods is None or method in self.methods


class Router:
    """First match wins; unmatched requests get the top-level sections as route ``other``."""

    __slots__ = ("fallback", "routes")

    def __init__(self, routes: list[CompiledRoute], fallback: CompiledRoute) -> None:
        self.routes = routes
        self.fallback = fallback

    def match(self, method: str, path: str) -> CompiledRoute:
        """The route for this request."""
        for route in self.routes:
            if route.matches(method, path):
                return route
        return self.fallback
