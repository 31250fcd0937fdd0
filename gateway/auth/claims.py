"""Claim checks and tier resolution of a token whose signature is already verified.

Rules (``leeway`` is the tolerated clock skew):

* ``exp`` is required; the token is expired once ``now >= exp + leeway``.
* ``nbf`` and ``iat``, when present, must not be later than ``now + leeway``.
* ``iss`` must equal ``auth.issuer`` when that is set.
* ``aud`` (a string or a list) must name one of ``auth.audience`` when that is set. A token
  that carries an ``aud`` while the route expects none is refused too (RFC 7519 §4.1.3: a
  recipient that does not identify itself with the audience must reject the token), so a
  token minted for another service of the same identity provider is not accepted here.
* ``sub`` is required: a non-empty string of at most 256 characters without control
  characters (it travels upstream in a header).
* Time claims must be finite numbers; a boolean, a string or ``1e999`` is malformed.

Tiers. The *named* tiers are those the policy mentions anywhere: ``auth.tiers`` of any
route and the keys of ``rate_limits.per_tier``, ``tokens_per_tier`` and ``daily_budget_usd``
(top level and routes). When there are named tiers, the known tiers are those plus
``default_tier``, and a token's tier outside them becomes ``default_tier``. When the policy
names no tier at all, any tier that is a sane token (1-64 characters of ``[A-Za-z0-9_.-]``)
is accepted as is, anything else becomes ``default_tier``. With ``default_tier: null`` such
tokens are refused (403 ``insufficient_scope``, reason ``unknown_tier``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.auth.failures import TokenError
from gateway.policy.schema import Policy
from gateway.policy.sections import AuthConfig, RateLimitConfig

_SANE_TIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SUB_CHARS = 256


def named_tiers(policy: Policy) -> frozenset[str]:
    """Tiers the policy mentions in ``auth.tiers`` and the per-tier rate limits and budgets."""
    names: set[str] = set()
    auths = [policy.auth, *(r.auth for r in policy.routes)]
    limits = [policy.rate_limits, *(r.rate_limits for r in policy.routes)]
    for auth in auths:
        if auth is not None and auth.tiers:
            names.update(auth.tiers)
    for rl in limits:
        if isinstance(rl, RateLimitConfig):
            names.update(rl.per_tier, rl.tokens_per_tier, rl.daily_budget_usd)
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """What the claims of a verified token must satisfy (derived from ``auth`` once)."""

    issuer: str | None
    audience: frozenset[str] | None
    leeway: float
    tier_claim: str
    default_tier: str | None
    known_tiers: frozenset[str]
    """Named tiers plus ``default_tier``; empty when the policy names no tier."""

    @classmethod
    def from_config(cls, cfg: AuthConfig, named: Iterable[str]) -> ClaimRules:
        """Rules for ``cfg`` given the policy's named tiers."""
        aud = cfg.audience
        audience = None if aud is None else frozenset([aud] if isinstance(aud, str) else aud)
        known = frozenset(named)
        if known and cfg.default_tier is not None:
            known = known | {cfg.default_tier}
        return cls(cfg.issuer, audience, cfg.leeway, cfg.tier_claim, cfg.default_tier, known)

    def resolve_tier(self, value: object) -> str:
        """The tier of a token whose tier claim is ``value``; raises ``unknown_tier``."""
        if isinstance(value, str) and (
            value in self.known_tiers if self.known_tiers else _SANE_TIER.fullmatch(value)
        ):
            return value
        if self.default_tier is None:
            raise TokenError("unknown_tier")
        return self.default_tier

    def check(self, claims: dict[str, Any], now: float) -> tuple[str, str, float]:
        """``(sub, tier, deadline)`` of valid claims at Unix time ``now``; raises TokenError."""
        leeway = self.leeway
        exp = claims.get("exp")
        if exp is None:
            raise TokenError("missing_exp")
        deadline = _time(exp) + leeway
        if now >= deadline:
            raise TokenError("expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is not None and _time(value) > now + leeway:
                raise TokenError("not_yet_valid")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise TokenError("wrong_issuer")
        self._check_audience(claims.get("aud"))
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("missing_sub")
        if len(sub) > MAX_SUB_CHARS or _CONTROL.search(sub):
            raise TokenError("malformed")
        return sub, self.resolve_tier(claims.get(self.tier_claim)), deadline

    def _check_audience(self, aud: object) -> None:
        if aud is None:
            if self.audience is not None:
                raise TokenError("wrong_audience")
            return
        values = [aud] if isinstance(aud, str) else aud
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise TokenError("malformed")
        if self.audience is None or self.audience.isdisjoint(values):
            raise TokenError("wrong_audience")


def _time(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError("malformed")
    try:
        number = float(value)
    except OverflowError:
        raise TokenError("malformed") from None
    if not math.isfinite(number):
        raise TokenError("malformed")
    return number
