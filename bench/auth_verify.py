"""Cost of verifying a JWT per request, with and without the verified-token cache.

Run: ``python -m bench.auth_verify``. In-process ``timeit`` on the process's CPU time (not
wall time, so other processes on a busy machine do not count), best of 15 repeats of
~50 ms each; no network. It asserts nothing;
it prints one row per case:

* ``verify``: :meth:`gateway.auth.verify.Verifier.verify` on a token (HS256 with a 48-byte
  secret, RS256 with a 2048-bit key and a ``kid``; realistic claims: iss, aud, sub, tier,
  iat, exp, jti), once with ``cache_size: 0`` (full parse, signature and claim checks every
  time) and once with the cache warm (an LRU dict lookup by the token, an expiry
  check and the hit counter).
* ``stage``: the whole :class:`gateway.stages.auth.AuthStage` ``on_request`` (header scan,
  size and scheme checks, verification, identity headers), driven without an event loop on
  one reused request context (the context's own construction is the app's cost).

The ratio column is uncached / cached cost. The design target is a cached path under 5 µs.
"""

from __future__ import annotations

import os
import time
import timeit
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth.claims import ClaimRules
from gateway.auth.keys import KeySet, hmac_key, public_key
from gateway.auth.verify import Verifier
from gateway.context import RequestContext
from gateway.policy import load_policy_text
from gateway.routes import CompiledRoute
from gateway.stages.auth import AuthStage
from tests.authkit import AUDIENCE, ISSUER, claims, hs, rs, token

SECRET = os.urandom(48)
RSA_KEY = rsa.generate_private_key(65537, 2048)
CFG = load_policy_text(
    "version: 1\nupstream: {url: 'http://127.0.0.1:1'}\n"
    f"auth: {{secret: {{env: X}}, issuer: '{ISSUER}', audience: '{AUDIENCE}'}}\n"
).auth


def _verifier(cache_size: int) -> Verifier:
    keys = KeySet(
        [hmac_key(SECRET, ["HS256"]), public_key(RSA_KEY.public_key(), "rsa-1")],
    )
    rules = ClaimRules(ISSUER, frozenset([AUDIENCE]), 30.0, "tier", "free", frozenset())
    return Verifier(["HS256", "RS256"], keys, None, rules, cache_size)


def _best_us(fn: Callable[[], Any]) -> float:
    timer = timeit.Timer(fn, timer=time.process_time)
    number, _ = timer.autorange()  # enough calls for >= 0.2 s
    number = max(number // 4, 1)
    return min(timer.repeat(repeat=15, number=number)) / number * 1e6


def _stage_call(stage: AuthStage, header: bytes) -> Callable[[], Any]:
    route = CompiledRoute("bench", "/", None, None, None, None, None)
    headers = [(b"host", b"gw"), (b"user-agent", b"bench"), (b"authorization", header)]

    ctx = RequestContext({}, "rid", route, "GET", "/", "127.0.0.1", headers)

    def call() -> Any:
        ctx.upstream_headers.clear()
        coro = stage.on_request(ctx)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError("the stage awaited something on the cached path")

    return call


def main() -> None:
    """Print the table."""
    assert CFG is not None
    tokens = {
        "HS256": token({"alg": "HS256", "typ": "JWT"}, claims(ttl=3600), hs(SECRET)).encode(),
        "RS256": token({"alg": "RS256", "kid": "rsa-1"}, claims(ttl=3600), rs(RSA_KEY)).encode(),
    }
    rows = []
    for alg, tok in tokens.items():
        uncached, cached = _verifier(0), _verifier(10_000)
        cached.verify(tok)
        cold = _best_us(lambda v=uncached, t=tok: v.verify(t))
        warm = _best_us(lambda v=cached, t=tok: v.verify(t))
        rows.append(("verify", alg, len(tok), cold, warm))
        stage_cold = AuthStage(CFG, uncached)
        stage_warm = AuthStage(CFG, cached)
        header = b"Bearer " + tok
        cold = _best_us(_stage_call(stage_cold, header))
        warm = _best_us(_stage_call(stage_warm, header))
        rows.append(("stage", alg, len(tok), cold, warm))
    print(f"auth verification cost per request (µs), {time.strftime('%Y-%m-%d')}")
    print(f"{'what':<8}{'alg':<7}{'bytes':>6}{'no cache':>11}{'cached':>9}{'ratio':>8}")
    for what, alg, size, cold, warm in rows:
        print(f"{what:<8}{alg:<7}{size:>6}{cold:>11.2f}{warm:>9.2f}{cold / warm:>7.0f}x")


if __name__ == "__main__":
    main()
