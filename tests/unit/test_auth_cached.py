"""The auth stage's cached path: expiry, exact-token keys, scheme spellings, identity headers."""

from __future__ import annotations

import asyncio
import json

from gateway.auth.claims import ClaimRules
from gateway.auth.keys import KeySet, hmac_key
from gateway.auth.verify import Verifier
from gateway.context import RequestContext
from gateway.errors import Deny
from gateway.policy import load_policy_text
from gateway.routes import CompiledRoute
from gateway.stages.auth import AuthStage
from tests.authkit import SECRET, claims, hs, token

T0 = 1_700_000_000.0
ROUTE = CompiledRoute("r", "/", None, None, None, None, None)


class Clock:
    """A settable clock."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy_auth(forward: str) -> str:
    return f"""
version: 1
upstream: {{url: "http://127.0.0.1:1"}}
auth: {{forward_headers: {forward}}}
"""


def stages(clock: Clock, *forwards: str) -> tuple[Verifier, list[AuthStage]]:
    """Stages with the given forward_headers sharing one verifier and its cache."""
    rules = ClaimRules(None, None, 30.0, "tier", "free", frozenset({"free", "pro"}))
    verifier = Verifier(["HS256"], KeySet([hmac_key(SECRET, ["HS256"])]), None, rules, 10, clock)
    verifier.want_claims_json = True
    built = []
    for forward in forwards:
        cfg = load_policy_text(policy_auth(forward)).auth
        assert cfg is not None
        built.append(AuthStage(cfg, verifier))
    return verifier, built


def run(stage: AuthStage, authorization: bytes) -> tuple[Deny | None, RequestContext]:
    ctx = RequestContext(
        {}, "rid", ROUTE, "GET", "/", "127.0.0.1", [(b"authorization", authorization)]
    )
    return asyncio.run(stage.on_request(ctx)), ctx


def hs_token(now: float = T0, ttl: int = 60, **changes: object) -> bytes:
    body = claims(now=now, ttl=ttl, aud=None, iss=None, **changes)
    return token({"alg": "HS256"}, body, hs(SECRET)).encode()


def test_a_cached_token_is_refused_once_expired() -> None:
    clock = Clock(T0)
    verifier, (stage,) = stages(clock, "{sub: X-Sub}")
    tok = hs_token()
    assert run(stage, b"Bearer " + tok)[0] is None
    clock.t = T0 + 60 + 29  # inside the leeway: still served from the cache
    assert run(stage, b"Bearer " + tok)[0] is None
    assert verifier.cache is not None and verifier.cache.hits == 1
    clock.t = T0 + 60 + 30
    deny, ctx = run(stage, b"Bearer " + tok)
    assert deny is not None and (deny.status, deny.message) == (401, "token expired")
    assert ctx.identity is None and ctx.upstream_headers == [] and len(verifier.cache) == 0


def test_only_the_exact_verified_bytes_hit_the_cache() -> None:
    verifier, (stage,) = stages(Clock(T0), "{sub: X-Sub}")
    tok = hs_token()
    assert run(stage, b"Bearer " + tok)[0] is None
    head, _, sig = tok.split(b".")
    forged = hs_token(sub="someone-else").split(b".")[1]
    tampered = [
        b".".join((head, forged, sig)),  # another payload under the cached token's signature
        # Not the last character: its low bits are padding, which base64 decoding ignores.
        tok[:-5] + (b"A" if tok[-5:-4] != b"A" else b"B") + tok[-4:],
        tok + b"A",
    ]
    for bad in tampered:
        deny, ctx = run(stage, b"Bearer " + bad)
        assert deny is not None and deny.type == "invalid_token", bad
        assert ctx.identity is None and ctx.upstream_headers == []
    assert verifier.cache is not None and len(verifier.cache) == 1
    # The scheme's spelling and the spaces around the token are not part of the key.
    for header in (b"bearer " + tok, b"BEARER   " + tok + b"  ", b"Bearer " + tok):
        deny, ctx = run(stage, header)
        assert deny is None and ctx.identity is not None and ctx.identity.sub == "user-1"
    assert verifier.cache.hits == 3 and len(verifier.cache) == 1


def test_too_large_comes_before_the_scheme() -> None:
    _, (stage,) = stages(Clock(T0), "{sub: X-Sub}")
    deny, _ = run(stage, b"Basic " + b"a" * 9000)
    assert deny is not None and deny.message == "token too large"
    deny, _ = run(stage, b"Bearerx" + hs_token())
    assert deny is not None and deny.type == "missing_token"


def test_stages_sharing_a_cache_entry_forward_their_own_header_names() -> None:
    verifier, (both, renamed, bare) = stages(
        Clock(T0),
        "{sub: X-Sub, tier: X-Plan, claims: X-Claims}",
        "{sub: X-Who}",
        "{sub: null, tier: null}",
    )
    tok = hs_token(tier="pro")
    first = run(both, b"Bearer " + tok)[1].upstream_headers
    assert [name for name, _ in first] == [b"x-sub", b"x-plan", b"x-claims"]
    assert first[:2] == [(b"x-sub", b"user-1"), (b"x-plan", b"pro")]
    sent = json.loads(first[2][1])
    assert (sent["sub"], sent["tier"], sent["exp"]) == ("user-1", "pro", T0 + 60)
    assert run(both, b"Bearer " + tok)[1].upstream_headers == first
    renamed_sent = run(renamed, b"Bearer " + tok)[1].upstream_headers
    assert renamed_sent == [(b"x-who", b"user-1"), (b"x-user-tier", b"pro")]
    assert run(bare, b"Bearer " + tok)[1].upstream_headers == []
    assert verifier.cache is not None and verifier.cache.hits == 3
