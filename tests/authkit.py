"""Keys, token minting and the hostile-token table shared by the auth tests.

Tokens are assembled by hand (not by a JOSE library) so that broken and hostile ones can be
made too: any header, any payload bytes, any signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

Signer = Callable[[bytes], bytes]
SECRET = b"test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ISSUER = "https://issuer.test"
AUDIENCE = "gateway-test"
_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    """base64url of compact JSON."""
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def token(header: dict[str, Any], claims: Any, sign: Signer | None) -> str:
    """A compact JWS; ``sign`` None leaves the signature empty."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    sig = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(sig)}"


def hs(secret: bytes, alg: str = "HS256") -> Signer:
    """HMAC signer."""
    digest = getattr(hashlib, "sha" + alg[2:])
    return lambda msg: hmac.new(secret, msg, digest).digest()


def rs(key: rsa.RSAPrivateKey, alg: str = "RS256") -> Signer:
    """RSASSA-PKCS1-v1_5 (RS*) or RSASSA-PSS (PS256) signer."""
    h = _HASH[alg[2:]]()
    if alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
        return lambda msg: key.sign(msg, pss, h)
    return lambda msg: key.sign(msg, padding.PKCS1v15(), h)


def es(key: ec.EllipticCurvePrivateKey, alg: str = "ES256") -> Signer:
    """ECDSA signer producing the raw ``r || s`` JWS form."""
    size = (key.curve.key_size + 7) // 8

    def sign(msg: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(_HASH[alg[2:]]())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def claims(
    sub: str | None = "user-1", tier: str | None = "pro", ttl: float = 3600, **extra: Any
) -> dict[str, Any]:
    """Good claims for the test issuer and audience, valid ``ttl`` seconds from now (an hour:
    tables of tokens are minted at collection and must outlast the whole suite)."""
    now = extra.pop("now", None) or time.time()
    out: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": uuid.uuid4().hex,
    }
    if sub is not None:
        out["sub"] = sub
    if tier is not None:
        out["tier"] = tier
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a private key's public half."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    """Public RSA JWK."""
    nums = key.public_key().public_numbers()
    n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "kid": kid, "use": "sig", "n": b64(n), "e": b64(b"\x01\x00\x01")}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str | None = None) -> dict[str, str]:
    """Public P-256 JWK."""
    nums = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": b64(nums.x.to_bytes(32, "big"))}
    jwk["y"] = b64(nums.y.to_bytes(32, "big"))
    if kid:
        jwk["kid"] = kid
    return jwk


@dataclass
class Keys:
    """The test keys: shared secret, an RSA key with id ``rsa-1`` and an EC key without id,
    and an attacker's RSA and EC keys the gateway does not know."""

    secret: bytes = SECRET
    rsa: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ec: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    evil_rsa: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(65537, 2048)
    )

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write the RSA key as a JWK file and the EC key as a PEM file."""
        jwk_path, pem_path = folder / "rsa.jwk.json", folder / "ec.pem"
        jwk_path.write_text(json.dumps(rsa_jwk(self.rsa, "rsa-1")))
        pem_path.write_bytes(public_pem(self.ec))
        return jwk_path, pem_path


def hostile_tokens(keys: Keys, elsewhere: str = "http://127.0.0.1:9") -> list[tuple[str, str, str]]:
    """``(name, token, reason)``: tokens a gateway configured with ``keys`` (HS256, RS256,
    ES256; issuer and audience of this module) must refuse, and why."""
    # The table is built when tests are collected, minutes before the last of them runs:
    # a day of validity keeps "good" tokens good for a whole suite run.
    good = claims(ttl=24 * 3600)
    hs256 = hs(keys.secret)
    evil = rs(keys.evil_rsa)

    def hs_tok(header: dict[str, Any] | None = None, body: Any = None, **changes: Any) -> str:
        return token(header or {"alg": "HS256"}, body or {**good, **changes}, hs256)

    def evil_tok(**header: Any) -> str:
        return token({"alg": "RS256", **header}, good, evil)

    h, p, s = hs_tok({"alg": "HS256", "typ": "JWT"}).split(".")
    rsa_pem, ec_pem = public_pem(keys.rsa), public_pem(keys.ec)
    evil_jwk = rsa_jwk(keys.evil_rsa, "evil")
    later = int(time.time()) + 3600
    dup_alg = b64(b'{"alg":"HS256","alg":"none"}')
    return [
        ("alg none", token({"alg": "none"}, good, None), "alg_not_allowed"),
        ("alg None", token({"alg": "None"}, good, None), "alg_not_allowed"),
        ("alg NONE", token({"alg": "NONE"}, good, None), "alg_not_allowed"),
        ("alg none signed", hs_tok({"alg": "none"}), "alg_not_allowed"),
        ("alg lower case", hs_tok({"alg": "hs256"}), "alg_not_allowed"),
        ("alg not a string", hs_tok({"alg": ["HS256"]}), "malformed"),
        ("HS/RS confusion", token({"alg": "HS256"}, good, hs(rsa_pem)), "bad_signature"),
        (
            "HS/RS confusion by kid",
            token({"alg": "HS256", "kid": "rsa-1"}, good, hs(rsa_pem)),
            "key_mismatch",
        ),
        ("HS/EC confusion", token({"alg": "HS256"}, good, hs(ec_pem)), "bad_signature"),
        ("stripped signature", f"{h}.{p}.", "bad_signature"),
        ("tampered payload", f"{h}.{b64json({**good, 'sub': 'admin'})}.{s}", "bad_signature"),
        ("wrong secret", token({"alg": "HS256"}, good, hs(b"x" * 40)), "bad_signature"),
        ("expired", hs_tok(body=claims(ttl=-3600)), "expired"),
        ("nbf in future", hs_tok(nbf=later), "not_yet_valid"),
        ("iat in future", hs_tok(iat=later), "not_yet_valid"),
        ("no exp", hs_tok(exp=None), "missing_exp"),
        ("exp a string", hs_tok(exp="9999999999"), "malformed"),
        ("exp infinite", hs_tok(exp=1e999), "malformed"),
        ("wrong iss", hs_tok(iss="https://evil.test"), "wrong_issuer"),
        ("wrong aud", hs_tok(aud="other-service"), "wrong_audience"),
        ("no aud", hs_tok(aud=None), "wrong_audience"),
        ("missing sub", hs_tok(body=claims(sub=None, ttl=24 * 3600)), "missing_sub"),
        ("empty sub", hs_tok(sub=""), "missing_sub"),
        ("sub with newline", hs_tok(sub="a\r\nX-Evil: 1"), "malformed"),
        ("claims a list", hs_tok(body=[good]), "malformed"),
        ("bad base64", f"{h}!.{p}.{s}", "malformed"),
        ("bad base64 length", f"{h}.{p}x.{s}", "bad_signature"),
        ("header not JSON", f"{b64(b'not json')}.{p}.{s}", "malformed"),
        ("header a list", f"{b64(b'[1]')}.{p}.{s}", "malformed"),
        ("header nested deep", f"{b64(b'[' * 5000)}.{p}.{s}", "malformed"),
        ("duplicate alg", f"{dup_alg}.{p}.{s}", "malformed"),
        ("two segments", f"{h}.{p}", "malformed"),
        ("four segments", f"{h}.{p}.{s}.{s}", "malformed"),
        ("one segment", "abc", "malformed"),
        ("crit", hs_tok({"alg": "HS256", "crit": ["exp"], "exp": 1}), "crit"),
        ("kid traversal", evil_tok(kid="../../../../etc/passwd"), "unknown_kid"),
        ("kid sql", evil_tok(kid="' OR 1=1 --"), "unknown_kid"),
        ("kid not a string", evil_tok(kid=7), "malformed"),
        ("kid too long", evil_tok(kid="k" * 300), "malformed"),
        ("jku elsewhere", evil_tok(kid="evil", jku=elsewhere), "unknown_kid"),
        ("x5u elsewhere", evil_tok(kid="evil", x5u=elsewhere), "unknown_kid"),
        ("embedded jwk", evil_tok(jwk=evil_jwk), "unknown_kid"),
        ("embedded jwk, real kid", evil_tok(kid="rsa-1", jwk=evil_jwk), "bad_signature"),
        ("x5c", evil_tok(x5c=[b64(b"not a certificate")]), "unknown_kid"),
        (
            "ES256 by RSA kid",
            token({"alg": "ES256", "kid": "rsa-1"}, good, es(keys.ec)),
            "key_mismatch",
        ),
        (
            "RS384 not allowed",
            token({"alg": "RS384", "kid": "rsa-1"}, good, rs(keys.rsa, "RS384")),
            "alg_not_allowed",
        ),
    ]
