"""JWKS end to end: a real HTTPS identity provider (own CA) and a real gateway process."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.authkit import claims, ec_jwk, es, rs, rsa_jwk, token
from tests.certs import make_tls
from tests.procs import Gateway, MockLLM, free_port


class IdentityProvider:
    """An HTTPS server answering ``GET /jwks.json`` with :attr:`keys`; counts fetches."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = json.dumps({"keys": provider.keys}).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Go away: the port refuses connections from now on."""
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    idp: IdentityProvider
    ca: Path
    start: Callable[..., Gateway]


@pytest.fixture
def env(tmp_path: Path, mock_llm: MockLLM, start_gateway: Callable[..., Gateway]) -> Iterator[Env]:
    ca, ctx = make_tls(tmp_path)
    idp = IdentityProvider(ctx)

    def start(refresh: str, cooldown: str, max_stale: str, ca_line: bool = True) -> Gateway:
        policy = f"""
version: 1
upstream: {{url: "{{upstream}}"}}
auth:
  algorithms: [RS256, ES256]
  jwks_url: "{idp.url}"
  {f'jwks_ca: "{ca}"' if ca_line else ""}
  jwks_refresh: {refresh}
  jwks_cooldown: {cooldown}
  jwks_max_stale: {max_stale}
"""
        return start_gateway(policy, mock_llm.url)

    yield Env(idp, ca, start)
    idp.stop()


RSA1 = rsa.generate_private_key(65537, 2048)
RSA2 = rsa.generate_private_key(65537, 2048)
EC1 = ec.generate_private_key(ec.SECP256R1())


def get(gw: Gateway, kid: str, key: Any = RSA1, tok: str | None = None) -> httpx.Response:
    """GET /echo/x with ``tok``, or with a fresh token signed by ``key`` under ``kid``."""
    if tok is None:
        is_ec = isinstance(key, ec.EllipticCurvePrivateKey)
        signer, alg = (es(key), "ES256") if is_ec else (rs(key), "RS256")
        tok = token({"alg": alg, "kid": kid}, claims(aud=None, iss=None), signer)
    return httpx.get(f"{gw.url}/echo/x", headers={"Authorization": f"Bearer {tok}"})


def test_rotation_is_picked_up_by_kid_and_drops_withdrawn_keys(env: Env) -> None:
    env.idp.keys = [rsa_jwk(RSA1, "k1"), ec_jwk(EC1, "e1")]
    gw = env.start(refresh="1h", cooldown="200ms", max_stale="1h")
    assert env.idp.fetches == 1
    old = token({"alg": "RS256", "kid": "k1"}, claims(aud=None, iss=None), rs(RSA1))
    assert get(gw, "k1", tok=old).status_code == 200
    assert get(gw, "e1", EC1).status_code == 200
    time.sleep(0.3)
    assert get(gw, "k2", RSA2).status_code == 401  # not published yet: the refetch finds none
    assert env.idp.fetches == 2
    env.idp.keys = [rsa_jwk(RSA2, "k2")]  # k1 withdrawn, k2 new
    time.sleep(0.3)
    r = get(gw, "k2", RSA2)  # unknown kid → one refetch → accepted
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["x-user-id"] == "user-1"
    assert env.idp.fetches == 3
    r = get(gw, "k1", tok=old)  # was cached; the rotation cleared the cache
    assert r.status_code == 401 and r.json()["error"]["message"] == "unknown key id"
    misses = gw.metric("gateway_cache_requests_total", {"cache": "jwks", "result": "miss"})
    assert misses >= 2


def test_random_kids_cannot_hammer_the_identity_provider(env: Env) -> None:
    env.idp.keys = [rsa_jwk(RSA1, "k1")]
    gw = env.start(refresh="1h", cooldown="2s", max_stale="1h")
    began = time.monotonic()
    with httpx.Client(base_url=gw.url) as client:
        for _ in range(40):
            tok = token({"alg": "RS256", "kid": uuid.uuid4().hex}, claims(), rs(RSA2))
            r = client.get("/echo/x", headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 401
    # The start-up fetch, then at most one per started cooldown (2 s) of the flood.
    assert env.idp.fetches <= 2 + int((time.monotonic() - began) / 2)


def test_provider_down_keeps_the_last_keys_until_max_stale_then_503(env: Env) -> None:
    env.idp.keys = [rsa_jwk(RSA1, "k1")]
    gw = env.start(refresh="500ms", cooldown="200ms", max_stale="2s")
    cached = token({"alg": "RS256", "kid": "k1"}, claims(aud=None, iss=None), rs(RSA1))
    assert get(gw, "k1", tok=cached).status_code == 200
    env.idp.stop()
    stopped = time.monotonic()
    assert get(gw, "k1").status_code == 200  # a new token: verified with the kept keys
    assert get(gw, "k1", tok=cached).status_code == 200
    while True:
        r = get(gw, "k1")
        if r.status_code != 200:
            break
        assert time.monotonic() - stopped < 10, "keys were used far past jwks_max_stale"
        time.sleep(0.1)
    assert time.monotonic() - stopped >= 1.0
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "auth_unavailable"
    assert get(gw, "k1", tok=cached).status_code == 503
    ready = httpx.get(f"{gw.admin}/readyz")
    assert ready.status_code == 503 and "auth.jwks: JWKS key set is stale" in ready.text
    assert gw.metric("gateway_jwks_fetch_total", {"result": "failure"}) >= 1
    assert gw.metric("gateway_jwks_age_seconds") >= 2


def test_no_key_set_yet_is_503_not_401(
    env: Env, mock_llm: MockLLM, start_gateway: Callable[..., Gateway]
) -> None:
    env.idp.keys = [rsa_jwk(RSA1, "k1")]
    gw = env.start(refresh="1h", cooldown="1s", max_stale="1h", ca_line=False)
    # The provider's certificate is not trusted without jwks_ca: no key set at all.
    r = get(gw, "k1")
    assert r.status_code == 503 and r.json()["error"]["type"] == "auth_unavailable"
    assert env.idp.fetches == 0  # the TLS handshake failed before any request
    ready = httpx.get(f"{gw.admin}/readyz")
    assert ready.status_code == 503 and "no JWKS key set yet" in ready.text
    down = f"https://127.0.0.1:{free_port()}/jwks.json"
    gw2 = start_gateway(
        f'version: 1\nupstream: {{url: "{{upstream}}"}}\n'
        f"auth: {{algorithms: [RS256], jwks_url: '{down}'}}\n",
        mock_llm.url,
        name="down.yaml",
    )
    assert get(gw2, "k1").status_code == 503
