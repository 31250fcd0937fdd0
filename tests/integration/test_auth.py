"""JWT identity through a real gateway process in front of the mock LLM's ``/echo``."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.authkit import SECRET, Keys, claims, es, hostile_tokens, hs, rs, token
from tests.procs import ROOT, Gateway, MockLLM, free_port

ENV = {"TEST_JWT_SECRET": SECRET.decode()}
CHALLENGE = 'Bearer realm="gateway"'

POLICY = """
version: 1
upstream: {{url: "{{upstream}}"}}
auth:
  algorithms: [HS256, RS256, ES256]
  secret: {{env: TEST_JWT_SECRET}}
  public_keys: ["{jwk}", "{pem}"]
  issuer: https://issuer.test
  audience: [gateway-test, second-audience]
  leeway: 5s
  forward_headers: {{sub: X-User-Id, tier: X-User-Tier, claims: X-User-Claims}}
routes:
  - {{name: public, path: /echo/public, auth: {{required: false}}}}
  - {{name: pro, path: /echo/pro, auth: {{tiers: [pro]}}}}
  - {{name: echo, path: /echo}}
"""


class Listener:
    """A TCP port that counts connections (to prove a jku/x5u URL is never fetched)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/keys.json"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.sock.close()


@pytest.fixture
def gateway(
    keys: Keys, mock_llm: MockLLM, start_gateway: Callable[..., Gateway], tmp_path: Path
) -> Gateway:
    jwk, pem = keys.write(tmp_path)
    return start_gateway(POLICY.format(jwk=jwk, pem=pem), mock_llm.url, env=ENV)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def test_hostile_tokens_get_401_and_never_echo_the_token(
    gateway: Gateway, keys: Keys, listener: Listener
) -> None:
    rows = hostile_tokens(keys, elsewhere=listener.url)
    with httpx.Client(base_url=gateway.url) as client:
        for name, tok, _reason in rows:
            r = client.get("/echo/x", headers=bearer(tok))
            assert r.status_code == 401, (name, r.status_code, r.text)
            body = r.json()["error"]
            assert body["type"] == "invalid_token", name
            assert r.headers["www-authenticate"] == f'{CHALLENGE}, error="invalid_token"', name
            assert all(part not in r.text for part in tok.split(".") if len(part) > 3), name
    assert listener.connections == 0  # jku / x5u were never fetched
    assert gateway.metric("gateway_auth_failures_total", {"reason": "alg_not_allowed"}) >= 5
    assert gateway.metric("gateway_auth_failures_total", {"reason": "bad_signature"}) >= 3
    assert gateway.metric("gateway_auth_failures_total", {"reason": "expired"}) == 1


def test_failure_messages_name_the_kind(gateway: Gateway, keys: Keys) -> None:
    hs256 = hs(keys.secret)
    cases = {
        "token expired": token({"alg": "HS256"}, claims(ttl=-60), hs256),
        "wrong audience": token({"alg": "HS256"}, claims(aud="nope"), hs256),
        "bad signature": token({"alg": "HS256"}, claims(), hs(b"y" * 40)),
        "algorithm not allowed": token({"alg": "none"}, claims(), None),
        "unsupported critical header": token({"alg": "HS256", "crit": ["b64"]}, claims(), hs256),
    }
    for message, tok in cases.items():
        r = httpx.get(f"{gateway.url}/echo/x", headers=bearer(tok))
        assert (r.status_code, r.json()["error"]["message"]) == (401, message)


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
def test_valid_tokens_reach_the_service_with_identity_headers(
    gateway: Gateway, keys: Keys, alg: str
) -> None:
    signer, header = {
        "HS256": (hs(keys.secret), {}),
        "RS256": (rs(keys.rsa), {"kid": "rsa-1"}),
        "ES256": (es(keys.ec), {}),
    }[alg]
    tok = token({"alg": alg, **header}, claims(sub=f"user-{alg}", tier="gold"), signer)
    for _ in range(2):  # the second one is served from the verified-token cache
        r = httpx.get(f"{gateway.url}/echo/x", headers=bearer(tok))
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert seen["x-user-id"] == f"user-{alg}"
        assert seen["x-user-tier"] == "free"  # "gold" is no tier of this policy: default_tier
        assert '"sub":"user-' in seen["x-user-claims"]
    hits = gateway.metric("gateway_cache_requests_total", {"cache": "jwt", "result": "hit"})
    assert hits >= 1


def test_missing_token_and_tier_restricted_route(gateway: Gateway, keys: Keys) -> None:
    r = httpx.get(f"{gateway.url}/echo/x")
    assert r.status_code == 401 and r.headers["www-authenticate"] == CHALLENGE
    assert r.json()["error"]["type"] == "missing_token"
    free = token({"alg": "HS256"}, claims(tier="free"), hs(keys.secret))
    r = httpx.get(f"{gateway.url}/echo/pro", headers=bearer(free))
    assert r.status_code == 403
    assert r.headers["www-authenticate"] == f'{CHALLENGE}, error="insufficient_scope"'
    assert r.json()["error"]["type"] == "insufficient_scope"
    pro = token({"alg": "HS256"}, claims(tier="pro"), hs(keys.secret))
    r = httpx.get(f"{gateway.url}/echo/pro", headers=bearer(pro))
    assert r.status_code == 200 and r.json()["headers"]["x-user-tier"] == "pro"


def test_oversized_authorization_header_is_refused_before_decoding(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/echo/x", headers=bearer("A" * 10 * 1024))
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "token too large"
    assert gateway.metric("gateway_auth_failures_total", {"reason": "token_too_large"}) == 1


SPOOF = {
    "X-User-Id": "admin",
    "X-User-Tier": "enterprise",
    "X_User_Id": "admin",
    "x-user_tier": "enterprise",
    "X-User-Claims": '{"sub":"admin"}',
}


def test_client_identity_headers_never_reach_the_service(gateway: Gateway, keys: Keys) -> None:
    r = httpx.get(f"{gateway.url}/echo/public", headers=SPOOF)
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert not any(k.replace("_", "-").startswith("x-user") for k in seen), seen
    tok = token({"alg": "HS256"}, claims(sub="real-user", tier="pro"), hs(keys.secret))
    for path in ("/echo/public", "/echo/x", "/echo/pro"):
        r = httpx.get(f"{gateway.url}{path}", headers={**SPOOF, **bearer(tok)})
        assert r.status_code == 200
        seen = r.json()["headers"]
        assert (seen["x-user-id"], seen["x-user-tier"]) == ("real-user", "pro")
        assert "x_user_id" not in seen and "x-user_tier" not in seen
        assert '"sub":"real-user"' in seen["x-user-claims"]


def test_public_route_needs_no_token(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/echo/public", headers=bearer("garbage"))
    assert r.status_code == 200 and "x-user-id" not in r.json()["headers"]


def test_policy_without_auth_strips_default_identity_headers(
    mock_llm: MockLLM, start_gateway: Callable[..., Gateway]
) -> None:
    gw = start_gateway('version: 1\nupstream: {url: "{upstream}"}\n', mock_llm.url)
    r = httpx.get(f"{gw.url}/echo/x", headers=SPOOF)
    assert r.status_code == 200
    seen = r.json()["headers"]
    assert "x-user-id" not in seen and "x-user-tier" not in seen and "x_user_id" not in seen


def test_missing_secret_is_a_start_error(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nupstream: {url: "http://127.0.0.1:9"}\n'
        "auth: {secret: {env: TEST_JWT_SECRET_NOT_SET}}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "-c",
            str(policy),
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "environment variable TEST_JWT_SECRET_NOT_SET is not set" in proc.stderr
