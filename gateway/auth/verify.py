"""Verification of a compact JWS token: header, key, signature, claims; then the cache.

Order, and why:

1. The verified-token cache (a hash and a dict lookup; see :mod:`gateway.auth.cache`).
2. Shape: exactly three base64url segments (strict alphabet, no padding); anything else is
   ``malformed`` before any decoding.
3. The header is parsed here, not by the library: a JSON object with unique keys; ``alg``
   must be a string in the allowlist (so ``none`` in any spelling never passes); any ``crit``
   is refused (no extension is understood); ``kid``, when present, is a string of at most
   256 characters used only as a lookup key. ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never
   read: keys come from the configuration alone.
4. Keys: those of the static set and the JWKS whose algorithm set holds ``alg`` (see
   :mod:`gateway.auth.keys`); a ``kid`` naming a key that does not fit ``alg`` is
   ``key_mismatch``, no key at all is ``unknown_kid`` (the stage may refetch the JWKS once),
   and a JWKS that is needed but missing or stale past ``jwks_max_stale`` is ``unavailable``.
5. Signature, by python-jose's key objects on the exact signing input parsed in step 2 (one
   parser for the whole token: no differential between ours and the library's).
6. Claims (:mod:`gateway.auth.claims`), decoded only after the signature holds.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable, Collection
from typing import Any

from gateway.auth.cache import TokenCache, Verified, token_key
from gateway.auth.claims import ClaimRules
from gateway.auth.failures import TokenError
from gateway.auth.jwks import JwksFetcher
from gateway.auth.keys import KeySet, SignatureCheck
from gateway.context import Identity
from gateway.telemetry import metrics

log = logging.getLogger("gateway.auth")

_COMPACT = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_KID_CHARS = 256
_JWKS_HIT = metrics.CACHE_REQUESTS.labels("jwks", "hit")
_JWKS_MISS = metrics.CACHE_REQUESTS.labels("jwks", "miss")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member")
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constant)


def _b64(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def json_segment(segment: bytes) -> dict[str, Any]:
    """Decode a base64url JSON object strictly (unique keys, no NaN); raises ``malformed``."""
    try:
        data = _DECODER.decode(_b64(segment).decode("utf-8"))
    except (ValueError, RecursionError):
        raise TokenError("malformed") from None
    if not isinstance(data, dict):
        raise TokenError("malformed")
    return data


def _valid(check: SignatureCheck, signing_input: bytes, signature: bytes) -> bool:
    try:
        return bool(check.verify(signing_input, signature))
    except Exception:  # the library boundary: any failure to verify is a bad signature
        log.debug("signature check raised", exc_info=True)
        return False


class Verifier:
    """Verifies tokens for one ``auth`` configuration (shared by routes that use the same)."""

    def __init__(
        self,
        algorithms: Collection[str],
        static: KeySet,
        jwks: JwksFetcher | None,
        rules: ClaimRules,
        cache_size: int,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.algorithms = frozenset(algorithms)
        self.static = static
        self.jwks = jwks
        self.rules = rules
        self.now = now
        self.cache = TokenCache(cache_size, now) if cache_size > 0 else None
        self.want_claims_json = False
        """Set by the stage factory when some route forwards all claims as JSON."""
        if jwks is not None:
            jwks.on_rotate(self.clear_cache)

    def clear_cache(self) -> None:
        """Forget every verified token (called when the key set rotates)."""
        if self.cache is not None:
            self.cache.clear()

    def verify(self, token: bytes) -> Verified:
        """The verified identity of ``token``; raises :class:`TokenError`."""
        cache = self.cache
        if cache is None:
            return self._verify(token)
        key = token_key(token)
        hit = cache.get(key)
        if hit is not None:
            if not hit.from_jwks or self.jwks is None or self.jwks.usable():
                return hit
            cache.discard(key)
        verified = self._verify(token)
        cache.put(key, verified)
        return verified

    async def refetch(self) -> bool:
        """After ``unknown_kid``: refetch the JWKS unless one ran within the cooldown; True
        when a fetch completed and the token is worth verifying again."""
        return self.jwks is not None and await self.jwks.refetch()

    def _verify(self, token: bytes) -> Verified:
        if _COMPACT.fullmatch(token) is None:
            raise TokenError("malformed")
        h64, p64, s64 = token.split(b".")
        header = json_segment(h64)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenError("malformed")
        if alg not in self.algorithms:
            raise TokenError("alg_not_allowed")
        if "crit" in header:
            raise TokenError("crit")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise TokenError("malformed")
        static, jwks = self._keys(kid, alg)
        try:
            signature = _b64(s64)
        except ValueError:
            raise TokenError("malformed") from None
        signing_input = token[: len(h64) + 1 + len(p64)]
        from_jwks = False
        if not signature:
            raise TokenError("bad_signature")
        if not any(_valid(c, signing_input, signature) for c in static):
            if not any(_valid(c, signing_input, signature) for c in jwks):
                raise TokenError("bad_signature")
            from_jwks = True
        claims = json_segment(p64)
        sub, tier, deadline = self.rules.check(claims, self.now())
        claims_json = None
        if self.want_claims_json:
            claims_json = json.dumps(claims, separators=(",", ":"), ensure_ascii=True).encode()
        identity = Identity(sub, tier, claims)
        return Verified(identity, sub.encode(), tier.encode(), claims_json, deadline, from_jwks)

    def _keys(self, kid: str | None, alg: str) -> tuple[list[SignatureCheck], list[SignatureCheck]]:
        static, named = self.static.lookup(kid, alg)
        fetched: list[SignatureCheck] = []
        stale = False
        if self.jwks is not None:
            keyset = self.jwks.keys if self.jwks.usable() else None
            if keyset is None:
                stale = True
            else:
                fetched, in_jwks = keyset.lookup(kid, alg)
                named = named or in_jwks
                if not static:
                    (_JWKS_HIT if fetched else _JWKS_MISS).inc()
        if static or fetched:
            return static, fetched
        if named:
            raise TokenError("key_mismatch")
        raise TokenError("unavailable" if stale else "unknown_kid")
