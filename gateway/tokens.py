"""Mint HS* tokens with a policy's secret, for trying the gateway out (``gateway token``)."""

from __future__ import annotations

import time
import uuid

from jose import jwt

from gateway.policy.schema import Policy


def mint_token(policy: Policy, sub: str, tier: str, ttl: float) -> str:
    """A token for ``sub`` in ``tier`` valid for ``ttl`` seconds, signed with the policy's
    shared secret and first HS* algorithm; raises ValueError when the policy has none."""
    auth = policy.auth
    if auth is None or auth.secret is None:
        raise ValueError("the policy has no auth.secret to sign with")
    alg = next((a for a in auth.algorithms if a.startswith("HS")), None)
    if alg is None:
        raise ValueError("auth.algorithms allows no HS* algorithm")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": sub,
        auth.tier_claim: tier,
        "iat": now,
        "exp": now + int(ttl),
        "jti": uuid.uuid4().hex,
    }
    if auth.issuer:
        claims["iss"] = auth.issuer
    if auth.audience:
        claims["aud"] = auth.audience
    token: str = jwt.encode(claims, auth.secret.resolve().decode(), algorithm=alg)
    return token
