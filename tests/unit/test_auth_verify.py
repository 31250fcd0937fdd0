"""Token verification with an injected clock: hostile tokens, key confusion, claims, tiers,
and the verified-token cache."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from gateway.auth.cache import TokenCache, Verified, token_key
from gateway.auth.claims import ClaimRules, named_tiers
from gateway.auth.failures import TokenError
from gateway.auth.jwks import JwksFetcher
from gateway.auth.keys import KeySet, hmac_key, jwk_key, public_key
from gateway.auth.verify import Verifier
from gateway.context import Identity
from gateway.policy import load_policy_text
from tests.authkit import (
    AUDIENCE,
    ISSUER,
    Keys,
    claims,
    es,
    hostile_tokens,
    hs,
    public_pem,
    rs,
    rsa_jwk,
    token,
)

ALGS = ["HS256", "RS256", "ES256", "PS256"]
KEYS = Keys()
HOSTILE = hostile_tokens(KEYS)
T0 = 1_700_000_000.0


class Clock:
    """A settable clock."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def static_keys(keys: Keys = KEYS) -> KeySet:
    return KeySet(
        [
            hmac_key(keys.secret, ALGS),
            jwk_key(rsa_jwk(keys.rsa, "rsa-1")),
            public_key(keys.ec.public_key(), None),
        ]
    )


def rules(**changes: Any) -> ClaimRules:
    base: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": frozenset([AUDIENCE, "second-audience"]),
        "leeway": 30.0,
        "tier_claim": "tier",
        "default_tier": "free",
        "known_tiers": frozenset({"free", "pro"}),
    }
    return ClaimRules(**{**base, **changes})


def verifier(clock: Clock | None = None, cache_size: int = 0, **rule_changes: Any) -> Verifier:
    now = clock or time.time
    return Verifier(ALGS, static_keys(), None, rules(**rule_changes), cache_size, now)


def reason_of(v: Verifier, tok: str) -> str:
    with pytest.raises(TokenError) as info:
        v.verify(tok.encode())
    return info.value.reason


@pytest.mark.parametrize(("name", "tok", "reason"), HOSTILE, ids=[r[0] for r in HOSTILE])
def test_hostile_token_is_refused_with_its_reason(name: str, tok: str, reason: str) -> None:
    v = verifier(cache_size=100)
    with pytest.raises(TokenError) as info:
        v.verify(tok.encode())
    assert info.value.reason == reason
    assert info.value.status == 401
    message = info.value.message
    assert all(part not in message for part in tok.split(".") if len(part) > 3)
    assert v.cache is not None and len(v.cache) == 0  # failures are never cached


@pytest.mark.parametrize(
    ("alg", "header", "signer"),
    [
        ("HS256", {}, hs(KEYS.secret)),
        ("RS256", {"kid": "rsa-1"}, rs(KEYS.rsa)),
        ("PS256", {"kid": "rsa-1"}, rs(KEYS.rsa, "PS256")),
        ("ES256", {}, es(KEYS.ec)),
        ("ES256", {"kid": "not-in-the-set"}, es(KEYS.ec)),
    ],
)
def test_valid_tokens_are_accepted(alg: str, header: dict[str, str], signer: Any) -> None:
    good = claims(sub="player-7", tier="pro", aud=["elsewhere", AUDIENCE])
    verified = verifier().verify(token({"alg": alg, **header}, good, signer).encode())
    assert verified.identity.sub == "player-7"
    assert verified.identity.tier == "pro"
    assert verified.sub == b"player-7" and verified.tier == b"pro"
    assert verified.identity.claims["jti"] == good["jti"]
    assert verified.from_jwks is False


def test_hmac_token_signed_with_a_public_key_never_verifies() -> None:
    # Only RSA and EC keys configured, HS256 allowed: the "secret" an attacker would use is
    # the public key itself; no key of the HMAC family exists, so nothing can verify it.
    only_public = KeySet(
        [jwk_key(rsa_jwk(KEYS.rsa, "rsa-1")), public_key(KEYS.ec.public_key(), None)]
    )
    v = Verifier(["HS256", "RS256", "ES256"], only_public, None, rules(), 0)
    for pem in (public_pem(KEYS.rsa), public_pem(KEYS.ec)):
        for header in ({"alg": "HS256"}, {"alg": "HS256", "kid": "rsa-1"}):
            assert reason_of(v, token(header, claims(), hs(pem))) in {"unknown_kid", "key_mismatch"}


def test_secret_that_is_a_public_key_or_short_is_refused_at_build() -> None:
    with pytest.raises(ValueError, match="looks like a public key"):
        hmac_key(public_pem(KEYS.rsa), ["HS256"])
    with pytest.raises(ValueError, match="looks like a public key"):
        hmac_key(json.dumps(rsa_jwk(KEYS.rsa, "k")).encode(), ["HS256"])
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        hmac_key(b"secret", ["HS256"])


def test_expiry_respects_the_leeway() -> None:
    clock = Clock(T0)
    v = verifier(clock)
    tok = token({"alg": "HS256"}, claims(now=T0, ttl=10), hs(KEYS.secret))
    clock.t = T0 + 39
    assert v.verify(tok.encode()).deadline == T0 + 40
    clock.t = T0 + 40
    assert reason_of(v, tok) == "expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_nbf_and_iat_may_be_in_the_future_only_within_the_leeway(claim: str) -> None:
    v = verifier(Clock(T0))
    ok = token({"alg": "HS256"}, claims(now=T0, **{claim: T0 + 30}), hs(KEYS.secret))
    assert v.verify(ok.encode()).identity.sub == "user-1"
    early = token({"alg": "HS256"}, claims(now=T0, **{claim: T0 + 31}), hs(KEYS.secret))
    assert reason_of(v, early) == "not_yet_valid"


def test_issuer_and_audience_are_checked_only_when_configured() -> None:
    free = verifier(Clock(T0), issuer=None, audience=None)
    anyone = token({"alg": "HS256"}, claims(now=T0, iss="https://x", aud=None), hs(KEYS.secret))
    assert free.verify(anyone.encode()).identity.sub == "user-1"
    # A token addressed to some audience is refused by a route that expects none (RFC 7519).
    addressed = token({"alg": "HS256"}, claims(now=T0, aud="svc"), hs(KEYS.secret))
    assert reason_of(free, addressed) == "wrong_audience"
    strict = verifier(Clock(T0))
    several = token({"alg": "HS256"}, claims(now=T0, aud=["a", "second-audience"]), hs(KEYS.secret))
    assert strict.verify(several.encode()).identity.sub == "user-1"
    bad_list = token({"alg": "HS256"}, claims(now=T0, aud=["a", 5]), hs(KEYS.secret))
    assert reason_of(strict, bad_list) == "malformed"


@pytest.mark.parametrize(
    ("named", "default", "claimed", "expected"),
    [
        ({"free", "pro"}, "free", "pro", "pro"),
        ({"free", "pro"}, "free", "gold", "free"),
        ({"free", "pro"}, "free", None, "free"),
        ({"free", "pro"}, "free", 5, "free"),
        ({"pro"}, "basic", "basic", "basic"),
        ({"free", "pro"}, None, "gold", None),
        ({"free", "pro"}, None, None, None),
        (set(), "free", "gold", "gold"),
        (set(), "free", "x" * 65, "free"),
        (set(), "free", "two words", "free"),
        (set(), None, "two words", None),
    ],
)
def test_tier_resolution(
    named: set[str], default: str | None, claimed: object, expected: str | None
) -> None:
    cfg = load_policy_text(
        "version: 1\nupstream: {url: 'http://127.0.0.1:1'}\n"
        f"auth: {{secret: {{env: X}}, default_tier: {json.dumps(default)}}}\n"
    ).auth
    assert cfg is not None
    r = ClaimRules.from_config(cfg, named)
    if expected is None:
        with pytest.raises(TokenError) as info:
            r.resolve_tier(claimed)
        assert (info.value.reason, info.value.status) == ("unknown_tier", 403)
    else:
        assert r.resolve_tier(claimed) == expected


def test_named_tiers_come_from_route_tiers_and_per_tier_limits() -> None:
    policy = load_policy_text(
        """
version: 1
upstream: {url: "http://127.0.0.1:1"}
auth: {secret: {env: X}}
rate_limits: {per_tier: {free: 10/minute}, daily_budget_usd: {enterprise: 5.0}}
routes:
  - {name: a, path: /a, auth: {tiers: [pro]}}
  - {name: b, path: /b, rate_limits: {tokens_per_tier: {team: 1000/day}}}
"""
    )
    assert named_tiers(policy) == {"free", "pro", "enterprise", "team"}
    bare = load_policy_text("version: 1\nupstream: {url: 'http://127.0.0.1:1'}\n")
    assert named_tiers(bare) == frozenset()


def test_cache_hits_after_the_first_verification_and_expires_with_the_token() -> None:
    clock = Clock(T0)
    v = verifier(clock, cache_size=10)
    assert v.cache is not None
    tok = token({"alg": "HS256"}, claims(now=T0, ttl=60), hs(KEYS.secret)).encode()
    first = v.verify(tok)
    assert (v.cache.hits, v.cache.misses) == (0, 1)
    assert v.verify(tok) is first
    assert (v.cache.hits, v.cache.misses) == (1, 1)
    clock.t = T0 + 60 + 30  # exp + leeway: the entry is gone and the token is expired
    assert reason_of(v, tok.decode()) == "expired"
    assert (v.cache.hits, v.cache.misses, len(v.cache)) == (1, 2, 0)


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = TokenCache(2, lambda: T0)
    entry = Verified(Identity("u", "free", {}), b"u", b"free", None, T0 + 10, False)
    a, b, c = (token_key(x) for x in (b"a", b"b", b"c"))
    cache.put(a, entry)
    cache.put(b, entry)
    assert cache.get(a) is entry  # a is now the most recently used
    cache.put(c, entry)
    assert len(cache) == 2
    assert cache.get(b) is None and cache.get(a) is entry and cache.get(c) is entry


def test_cache_disabled_with_size_zero() -> None:
    v = verifier(cache_size=0)
    tok = token({"alg": "HS256"}, claims(), hs(KEYS.secret)).encode()
    assert v.cache is None
    assert v.verify(tok) is not v.verify(tok)


def jwks_doc(*jwks: dict[str, str]) -> bytes:
    return json.dumps({"keys": list(jwks)}).encode()


def test_cache_is_cleared_when_the_jwks_rotates_and_unused_once_stale() -> None:
    mono = Clock(100.0)
    fetcher = JwksFetcher(f"https://idp.test/{uuid.uuid4()}", None, 60, 1, 30, clock=mono)
    assert not fetcher.usable() and fetcher.readiness() == "no JWKS key set yet"
    v = Verifier(["RS256"], KeySet([]), fetcher, rules(), 10, time.time)
    tok = token({"alg": "RS256", "kid": "k1"}, claims(), rs(KEYS.rsa)).encode()
    assert reason_of(v, tok.decode()) == "unavailable"
    fetcher.install(jwks_doc(rsa_jwk(KEYS.rsa, "k1")))
    assert v.verify(tok).from_jwks and v.cache is not None and len(v.cache) == 1
    assert fetcher.install(jwks_doc(rsa_jwk(KEYS.rsa, "k1"))) is False  # same keys
    assert len(v.cache) == 1
    assert fetcher.install(jwks_doc(rsa_jwk(KEYS.rsa, "k1"), rsa_jwk(KEYS.evil_rsa, "k2")))
    assert len(v.cache) == 0
    v.verify(tok)
    mono.t += 31  # past max_stale: neither the cache nor the keys may be used
    assert reason_of(v, tok.decode()) == "unavailable"
    assert fetcher.readiness() == "JWKS key set is stale"
