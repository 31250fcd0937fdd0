"""The auth stage: a Bearer JWT on every protected request, identity headers upstream.

* The token comes from ``Authorization: Bearer`` only; a header longer than
  ``auth.max_token_bytes`` is refused before any decoding, two ``Authorization`` headers are
  ``malformed``, another scheme counts as no token.
* Answers: no token → 401 ``missing_token`` with ``WWW-Authenticate: Bearer realm="gateway"``;
  a bad one → 401 ``invalid_token`` (``error="invalid_token"``), the message naming the kind;
  a tier outside the route's ``auth.tiers`` (or no known tier) → 403 ``insufficient_scope``;
  JWKS keys unavailable → 503 ``auth_unavailable`` with ``Retry-After: 5``. Failures are
  counted in ``gateway_auth_failures_total{reason}`` (a public route's missing token is not
  a failure).
* On a public route (``required: false``) a valid token still yields the identity and its
  headers; a missing or bad one lets the request through anonymously (``auth.tiers`` only
  applies to routes that require a token).
* The identity headers (``forward_headers``) of every route, plus the defaults
  ``X-User-Id``/``X-User-Tier``, are stripped from every client request on every route, in
  their ``-``/``_`` spellings too (many frameworks read ``X_User_Id`` as ``X-User-Id``), so
  only the gateway can set them.
"""

from __future__ import annotations

import itertools
import re

from gateway.auth.claims import ClaimRules, named_tiers
from gateway.auth.failures import MESSAGES, STATUS, Reason, TokenError
from gateway.auth.jwks import JwksFetcher
from gateway.auth.keys import FAMILY_ALGS, KeySet, VerifyKey, hmac_key, load_key_file
from gateway.auth.verify import Verifier
from gateway.context import RequestContext
from gateway.errors import Deny
from gateway.pipeline import BuildContext, Phase
from gateway.policy.sections import AuthConfig
from gateway.routes import CompiledRoute
from gateway.telemetry import metrics

_CHALLENGE = b'Bearer realm="gateway"'
_DEFAULT_FORWARD = ("x-user-id", "x-user-tier")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_RESERVED = frozenset({"authorization", "host", "content-length", "content-type", "cookie"})
_FAILED = {reason: metrics.AUTH_FAILURES.labels(reason) for reason in MESSAGES}


def _deny(reason: Reason) -> Deny:
    status = STATUS.get(reason, 401)
    if reason == "missing_token":
        return Deny(401, "missing_token", MESSAGES[reason], ((b"www-authenticate", _CHALLENGE),))
    if status == 503:
        return Deny(503, "auth_unavailable", MESSAGES[reason], ((b"retry-after", b"5"),))
    kind = "insufficient_scope" if status == 403 else "invalid_token"
    challenge = _CHALLENGE + b', error="' + kind.encode() + b'"'
    return Deny(status, kind, MESSAGES[reason], ((b"www-authenticate", challenge),))


_DENIES: dict[Reason, Deny] = {reason: _deny(reason) for reason in MESSAGES}


class AuthStage:
    """Verifies the Bearer token of one route and forwards the identity."""

    name = "auth"
    phase = Phase.AUTH
    needs_body = False

    def __init__(self, cfg: AuthConfig, verifier: Verifier) -> None:
        self.verifier = verifier
        self.required = cfg.required
        self.max_bytes = cfg.max_token_bytes
        self.tiers = frozenset(cfg.tiers) if cfg.tiers and cfg.required else None
        fwd = cfg.forward_headers
        self.h_sub = fwd.sub.lower().encode() if fwd.sub else None
        self.h_tier = fwd.tier.lower().encode() if fwd.tier else None
        self.h_claims = fwd.claims.lower().encode() if fwd.claims else None

    def _fail(self, reason: Reason) -> Deny | None:
        _FAILED[reason].inc()
        return _DENIES[reason] if self.required else None

    async def on_request(self, ctx: RequestContext) -> Deny | None:
        """Verify the token; set ``ctx.identity`` and the identity headers, or deny."""
        raw = None
        for k, v in ctx.headers:
            if k == b"authorization":
                if raw is not None:
                    return self._fail("malformed")
                raw = v
        # No Bearer token is normal on a public route, so not counted as a failure there.
        if raw is None:
            return self._fail("missing_token") if self.required else None
        if len(raw) > self.max_bytes:
            return self._fail("token_too_large")
        # The usual spelling first: it spares building a lower-cased copy of the scheme.
        if not raw.startswith(b"Bearer ") and raw[:7].lower() != b"bearer ":
            return self._fail("missing_token") if self.required else None
        token = raw[7:].strip(b" ")
        try:
            verified = self.verifier.verify(token)
        except TokenError as exc:
            if exc.reason != "unknown_kid" or not await self.verifier.refetch():
                return self._fail(exc.reason)
            try:
                verified = self.verifier.verify(token)
            except TokenError as again:
                return self._fail(again.reason)
        if self.tiers is not None and verified.identity.tier not in self.tiers:
            return self._fail("insufficient_scope")
        ctx.identity = verified.identity
        out = ctx.upstream_headers
        if self.h_sub is not None:
            out.append((self.h_sub, verified.sub))
        if self.h_tier is not None:
            out.append((self.h_tier, verified.tier))
        if self.h_claims is not None and verified.claims_json is not None:
            out.append((self.h_claims, verified.claims_json))
        return None


def _spellings(name: str) -> set[bytes]:
    """``name`` lower-cased in every mix of ``-`` and ``_`` (at most 16)."""
    parts = re.split(r"[-_]", name.lower())
    if len(parts) > 5:
        return {name.lower().encode()}
    return {
        "".join(p + s for p, s in zip(parts, (*seps, ""), strict=True)).encode()
        for seps in itertools.product("-_", repeat=len(parts) - 1)
    }


def _forward_names(cfg: AuthConfig | None) -> list[str]:
    if cfg is None:
        return []
    fwd = cfg.forward_headers
    names = [n for n in (fwd.sub, fwd.tier, fwd.claims) if n]
    for n in names:
        if not _HEADER_NAME.fullmatch(n) or n.lower() in _RESERVED:
            raise ValueError(f"auth.forward_headers: {n!r} cannot be an identity header name")
    return names


def _jwks(cfg: AuthConfig, build: BuildContext) -> JwksFetcher:
    assert cfg.jwks_url is not None
    parts = (cfg.jwks_url, cfg.jwks_ca, cfg.jwks_refresh, cfg.jwks_cooldown, cfg.jwks_max_stale)
    key = "auth.jwks " + " ".join(map(str, parts))
    fetcher = build.shared.get(key)
    if isinstance(fetcher, JwksFetcher):
        return fetcher
    fetcher = JwksFetcher(
        cfg.jwks_url, cfg.jwks_ca, cfg.jwks_refresh, cfg.jwks_cooldown, cfg.jwks_max_stale
    )
    build.shared[key] = fetcher
    build.on_start.append(fetcher.start)
    build.on_close.append(fetcher.close)
    n = sum(1 for k in build.shared if k.startswith("auth.jwks "))
    f = fetcher

    async def ready() -> str | None:
        return f.readiness()

    build.readiness["auth.jwks" if n == 1 else f"auth.jwks.{n}"] = ready
    return fetcher


def _static_keys(cfg: AuthConfig) -> list[VerifyKey]:
    allowed = set(cfg.algorithms)
    keys: list[VerifyKey] = []
    if cfg.secret is not None:
        if not allowed & FAMILY_ALGS["HMAC"]:
            raise ValueError("auth.secret is set but auth.algorithms allows no HS* algorithm")
        try:
            secret = cfg.secret.resolve()
        except ValueError as exc:
            raise ValueError(f"auth.secret: {exc}") from None
        keys.append(hmac_key(secret, allowed))
    elif allowed & FAMILY_ALGS["HMAC"]:
        raise ValueError("auth.algorithms allows HS* but auth.secret is not set")
    for path in cfg.public_keys:
        keys.extend(load_key_file(path))
    if allowed - FAMILY_ALGS["HMAC"] and not cfg.public_keys and not cfg.jwks_url:
        raise ValueError("auth.algorithms allows RS*/PS*/ES* but no public_keys or jwks_url")
    return keys


def _verifier(cfg: AuthConfig, build: BuildContext) -> Verifier:
    key = "auth.verifier " + cfg.model_dump_json(exclude={"required", "tiers", "forward_headers"})
    verifier = build.shared.get(key)
    if isinstance(verifier, Verifier):
        return verifier
    try:
        static = KeySet(_static_keys(cfg))
    except ValueError as exc:
        raise ValueError(str(exc) if str(exc).startswith("auth.") else f"auth: {exc}") from None
    jwks = _jwks(cfg, build) if cfg.jwks_url else None
    rules = ClaimRules.from_config(cfg, named_tiers(build.policy))
    verifier = Verifier(cfg.algorithms, static, jwks, rules, cfg.cache_size)
    build.shared[key] = verifier
    return verifier


def build_auth_stages(route: CompiledRoute, build: BuildContext) -> list[AuthStage]:
    """The auth stage of ``route`` (none without ``auth``, or for a public route without keys);
    always registers the identity header names to strip from client requests."""
    names = [*_DEFAULT_FORWARD, *_forward_names(build.policy.auth), *_forward_names(route.auth)]
    for name in names:
        build.strip_headers.update(_spellings(name))
    cfg = route.auth
    if cfg is None:
        return []
    if not cfg.required and cfg.secret is None and not cfg.public_keys and not cfg.jwks_url:
        return []
    try:
        verifier = _verifier(cfg, build)
    except ValueError as exc:
        raise ValueError(f"route {route.name}: {exc}") from None
    if cfg.forward_headers.claims:
        verifier.want_claims_json = True
    return [AuthStage(cfg, verifier)]
