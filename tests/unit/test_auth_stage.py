"""Key loading, the JWKS fetcher's cooldown, and the auth stage and its factory."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.auth.jwks import JwksFetcher
from gateway.auth.keys import jwks_keys, load_key_file
from gateway.context import RequestContext
from gateway.errors import Deny
from gateway.pipeline import BuildContext
from gateway.policy import load_policy_text
from gateway.routes import CompiledRoute
from gateway.stages.auth import AuthStage, build_auth_stages
from gateway.telemetry.metrics import REGISTRY
from tests.authkit import SECRET, Keys, claims, ec_jwk, hs, public_pem, rsa_jwk, token

KEYS = Keys()
ENV = "TEST_AUTH_STAGE_SECRET"


def test_key_files_pem_jwk_and_refusals(tmp_path: Path) -> None:
    pem = tmp_path / "k.pem"
    pem.write_bytes(public_pem(KEYS.rsa) + public_pem(KEYS.ec))
    assert [k.family for k in load_key_file(str(pem))] == ["RSA", "EC"]
    jwk = tmp_path / "k.json"
    jwk.write_text(json.dumps({"keys": [rsa_jwk(KEYS.rsa, "a"), ec_jwk(KEYS.ec, "b")]}))
    assert [(k.kid, sorted(k.checks)) for k in load_key_file(str(jwk))] == [
        ("a", ["PS256", "RS256", "RS384", "RS512"]),
        ("b", ["ES256"]),
    ]
    private = tmp_path / "private.pem"
    private.write_bytes(
        KEYS.ec.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="private key"):
        load_key_file(str(private))
    weak = tmp_path / "weak.pem"
    weak.write_bytes(public_pem(rsa.generate_private_key(65537, 1024)))
    with pytest.raises(ValueError, match="1024 bits"):
        load_key_file(str(weak))
    with pytest.raises(ValueError, match="cannot read"):
        load_key_file(str(tmp_path / "missing.pem"))


def test_jwks_skips_symmetric_private_and_foreign_keys() -> None:
    p521 = ec.generate_private_key(ec.SECP521R1()).public_key().public_numbers()
    doc = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {**rsa_jwk(KEYS.rsa, "enc"), "use": "enc"},
            {**rsa_jwk(KEYS.rsa, "priv"), "d": "AQAB"},
            {"kty": "EC", "crv": "P-521", "x": str(p521.x), "y": str(p521.y)},
            {**rsa_jwk(KEYS.rsa, "rs384-only"), "alg": "RS384"},
            "not an object",
        ]
    }
    keys, skipped = jwks_keys(json.dumps(doc).encode())
    assert [(k.kid, sorted(k.checks)) for k in keys] == [("rs384-only", ["RS384"])]
    assert len(skipped) == 5


def test_unknown_kid_refetches_at_most_once_per_cooldown() -> None:
    class Counting(JwksFetcher):
        calls = 0

        async def _fetch(self) -> None:
            Counting.calls += 1
            await asyncio.sleep(0.01)

    mono = [0.0]
    fetcher = Counting(f"https://idp.test/{uuid.uuid4()}", None, 300, 10, 60, clock=lambda: mono[0])

    async def flood() -> list[bool]:
        fetcher._session = object()  # type: ignore[assignment]  # no network in this test
        return list(await asyncio.gather(*(fetcher.refetch() for _ in range(50))))

    first = asyncio.run(flood())
    assert Counting.calls == 1 and all(first)  # one fetch, joined by all 50 requests
    mono[0] = 5.0
    assert asyncio.run(flood()) == [False] * 50 and Counting.calls == 1
    mono[0] = 10.5
    asyncio.run(flood())
    assert Counting.calls == 2


def ctx_for(route: CompiledRoute, headers: list[tuple[bytes, bytes]]) -> RequestContext:
    return RequestContext({}, "rid", route, "GET", "/x", "127.0.0.1", headers)


def build(policy_yaml: str, monkeypatch: pytest.MonkeyPatch) -> tuple[BuildContext, list[Any]]:
    monkeypatch.setenv(ENV, SECRET.decode())
    policy = load_policy_text(policy_yaml)
    ctx = BuildContext(policy)
    route = CompiledRoute("r", "/", None, None, policy.auth, None, None)
    return ctx, build_auth_stages(route, ctx)


POLICY = f"""
version: 1
upstream: {{url: "http://127.0.0.1:1"}}
auth:
  secret: {{env: {ENV}}}
  tiers: [pro]
  max_token_bytes: 1KiB
  forward_headers: {{sub: X-Sub, tier: X-Plan, claims: X-Claims}}
"""


def run(stage: AuthStage, headers: list[tuple[bytes, bytes]]) -> tuple[Deny | None, RequestContext]:
    route = CompiledRoute("r", "/", None, None, None, None, None)
    ctx = ctx_for(route, headers)
    return asyncio.run(stage.on_request(ctx)), ctx


def test_stage_answers_and_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    build_ctx, stages = build(POLICY, monkeypatch)
    (stage,) = stages
    assert {b"x-sub", b"x_sub", b"x-plan", b"x-claims", b"x-user-id", b"x_user_id"} <= (
        build_ctx.strip_headers
    )
    challenge = b'Bearer realm="gateway"'
    deny, _ = run(stage, [])
    assert deny is not None and (deny.status, deny.type) == (401, "missing_token")
    assert deny.headers == ((b"www-authenticate", challenge),)
    deny, _ = run(stage, [(b"authorization", b"Basic dXNlcjpwYXNz")])
    assert deny is not None and deny.type == "missing_token"
    deny, _ = run(stage, [(b"authorization", b"Bearer " + b"a" * 2000)])
    assert deny is not None and (deny.status, deny.message) == (401, "token too large")
    assert deny.headers == ((b"www-authenticate", challenge + b', error="invalid_token"'),)
    pro = token({"alg": "HS256"}, claims(aud=None, iss=None), hs(SECRET)).encode()
    deny, _ = run(stage, [(b"authorization", b"Bearer " + pro), (b"authorization", b"Bearer x")])
    assert deny is not None and deny.message == "malformed token"
    deny, ctx = run(stage, [(b"authorization", b"bearer  " + pro)])
    assert deny is None and ctx.identity is not None and ctx.identity.sub == "user-1"
    sent = dict(ctx.upstream_headers)
    assert sent[b"x-sub"] == b"user-1" and sent[b"x-plan"] == b"pro"
    assert json.loads(sent[b"x-claims"])["sub"] == "user-1"
    free = token({"alg": "HS256"}, claims(tier="free", aud=None, iss=None), hs(SECRET)).encode()
    deny, ctx = run(stage, [(b"authorization", b"Bearer " + free)])
    assert deny is not None and (deny.status, deny.type) == (403, "insufficient_scope")
    assert deny.headers == ((b"www-authenticate", challenge + b', error="insufficient_scope"'),)
    assert ctx.upstream_headers == [] and ctx.identity is None


def failures(reason: str) -> float:
    value = REGISTRY.get_sample_value("gateway_auth_failures_total", {"reason": reason})
    return value or 0.0


def test_public_route_lets_bad_tokens_through_anonymously(monkeypatch: pytest.MonkeyPatch) -> None:
    _, (stage,) = build(POLICY.replace("tiers: [pro]", "required: false"), monkeypatch)
    missing, malformed = failures("missing_token"), failures("malformed")
    deny, ctx = run(stage, [(b"authorization", b"Bearer not.a.token")])
    assert deny is None and ctx.identity is None and ctx.upstream_headers == []
    assert run(stage, [])[0] is None
    # A bad token is counted, a public route's missing token is not.
    assert (failures("missing_token"), failures("malformed")) == (missing, malformed + 1)
    good = token({"alg": "HS256"}, claims(aud=None, iss=None), hs(SECRET)).encode()
    deny, ctx = run(stage, [(b"authorization", b"Bearer " + good)])
    assert deny is None and ctx.identity is not None


def test_routes_without_auth_still_strip_identity_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    build_ctx, stages = build("version: 1\nupstream: {url: 'http://127.0.0.1:1'}\n", monkeypatch)
    assert stages == []
    assert {b"x-user-id", b"x_user_id", b"x-user_id", b"x-user-tier"} <= build_ctx.strip_headers


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("{secret: {env: TEST_AUTH_UNSET}}", "auth.secret: environment variable TEST_AUTH_UNSET"),
        ("{algorithms: [RS256]}", "no public_keys or jwks_url"),
        ("{}", "auth.secret is not set"),
        (f"{{secret: {{env: {ENV}}}, algorithms: [ES256], jwks_url: 'https://x'}}", "no HS*"),
        (f"{{secret: {{env: {ENV}}}, forward_headers: {{sub: Host}}}}", "'Host' cannot be"),
    ],
)
def test_build_errors_are_clear(auth: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_AUTH_UNSET", raising=False)
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        build(f"version: 1\nupstream: {{url: 'http://127.0.0.1:1'}}\nauth: {auth}\n", monkeypatch)
