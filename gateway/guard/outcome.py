"""What a guardrail did to one request: metrics, log lines, ``X-Guardrail-Action``.

Every rule hit is counted in ``gateway_guardrail_actions_total{stage,rule,action}`` and logged
(``gateway.guard``: request id, route, stage, rule, action — never the text). The request's
outcome is the most severe action of either stage; it is kept in ``ctx.notes`` and sent to the
client in ``X-Guardrail-Action`` (``pass`` when the checks ran and found nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from gateway.context import RequestContext
from gateway.errors import Headers
from gateway.telemetry import metrics

log = logging.getLogger("gateway.guard")

HEADER = b"x-guardrail-action"
NOTE = "guardrail"
#: All actions of both stages, mildest first; the header shows the most severe one.
SEVERITY = ("pass", "monitor", "mask", "truncate", "sanitize", "replace", "block")
_RANK = {action: i for i, action in enumerate(SEVERITY)}
_VALUES = {action: action.encode() for action in SEVERITY}


def record(ctx: RequestContext, stage: str, hits: Iterable[tuple[str, str]]) -> None:
    """Count and log rule hits; raise the request's outcome to the most severe action."""
    for rule, action in hits:
        metrics.GUARDRAIL_ACTIONS.labels(stage, rule, action).inc()
        log.info(
            "guardrail rule matched",
            extra={
                "request_id": ctx.request_id,
                "route": ctx.route.name,
                "stage": stage,
                "rule": rule,
                "action": action,
            },
        )
        note(ctx, action)


def note(ctx: RequestContext, action: str) -> None:
    """Raise ``ctx.notes["guardrail"]`` to ``action`` when it is more severe."""
    current = ctx.notes.get(NOTE, "pass")
    if _RANK.get(action, 0) > _RANK.get(current, 0):
        ctx.notes[NOTE] = action


def set_header(headers: Headers, ctx: RequestContext) -> None:
    """Put the request's outcome in ``headers`` (replacing an earlier value)."""
    action = ctx.notes.get(NOTE, "pass")
    value = _VALUES.get(action) if isinstance(action, str) else None
    if value is None:
        value = str(action).encode()
    for k, _ in headers:
        if k == HEADER:  # the input guardrail's value: only then is the list rebuilt
            headers[:] = [(k, v) for k, v in headers if k != HEADER]
            break
    headers.append((HEADER, value))
