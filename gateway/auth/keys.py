"""Verification keys: the HMAC secret, PEM/JWK public key files and JWKS documents.

Every key knows its family (``HMAC``, ``RSA``, ``EC``) and exactly which algorithms it may
verify: its family's algorithms, narrowed by its JWK ``alg`` and, for EC, by its curve
(P-256 → ES256, P-384 → ES384). A token is only ever checked against keys whose set holds
its ``alg``, so an HS256 token can never be "verified" with an RSA or EC public key used as
an HMAC secret, whatever its header says. A JWKS never supplies symmetric keys.

Signatures are checked by python-jose's key classes (cryptography backend). python-jose has
no PS256, so :class:`PssKey` adds it with the same ``verify(msg, sig)`` interface (RSASSA-PSS,
MGF1 and salt length of SHA-256, RFC 7518 §3.5).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jose.backends import ECKey, HMACKey, RSAKey

Family = Literal["HMAC", "RSA", "EC"]

FAMILY_ALGS: dict[Family, frozenset[str]] = {
    "HMAC": frozenset({"HS256", "HS384", "HS512"}),
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256"}),
    "EC": frozenset({"ES256", "ES384"}),
}
_CURVE_ALG = {"secp256r1": "ES256", "secp384r1": "ES384"}
_JWK_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
MIN_RSA_BITS = 2048
MIN_SECRET_BYTES = 32


class SignatureCheck(Protocol):
    """A key bound to one algorithm (python-jose's ``Key`` interface)."""

    def verify(self, msg: bytes, sig: bytes) -> bool:
        """True when ``sig`` is a valid signature of ``msg``."""
        ...


class PssKey:
    """PS256 verification with an RSA public key (python-jose lacks RSASSA-PSS)."""

    __slots__ = ("_key",)

    def __init__(self, key: rsa.RSAPublicKey) -> None:
        self._key = key

    def verify(self, msg: bytes, sig: bytes) -> bool:
        """True when ``sig`` is a valid PS256 signature of ``msg``."""
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        try:
            self._key.verify(sig, msg, pss, hashes.SHA256())
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key, with a bound checker per algorithm it may verify."""

    kid: str | None
    family: Family
    checks: Mapping[str, SignatureCheck]
    fingerprint: bytes
    """Digest of the key and its id: a key set whose fingerprints change has rotated."""


class KeySet:
    """Keys with an id are found by ``kid`` only; keys without one are tried for any token
    whose ``alg`` they fit (a PEM file has no id, and issuers set a ``kid`` anyway)."""

    __slots__ = ("_anonymous", "_by_kid", "fingerprint")

    def __init__(self, keys: Iterable[VerifyKey]) -> None:
        self._by_kid: dict[str, list[VerifyKey]] = {}
        self._anonymous: list[VerifyKey] = []
        prints = []
        for key in keys:
            prints.append(key.fingerprint)
            if key.kid is None:
                self._anonymous.append(key)
            else:
                self._by_kid.setdefault(key.kid, []).append(key)
        self.fingerprint = frozenset(prints)

    def __len__(self) -> int:
        return len(self.fingerprint)

    def lookup(self, kid: str | None, alg: str) -> tuple[list[SignatureCheck], bool]:
        """Checkers that may verify ``alg`` for this ``kid``, and whether ``kid`` names a key
        of this set (then only that key is used, even when it does not fit ``alg``)."""
        if kid is not None:
            named = self._by_kid.get(kid)
            if named is not None:
                return [k.checks[alg] for k in named if alg in k.checks], True
        return [k.checks[alg] for k in self._anonymous if alg in k.checks], False


def _print(kid: str | None, der: bytes) -> bytes:
    return hashlib.sha256((kid or "").encode() + b"\0" + der).digest()


def hmac_key(secret: bytes, allowed: Iterable[str]) -> VerifyKey:
    """The shared secret as a key for the allowed HS* algorithms; refuses short secrets and
    secrets that are really public keys (PEM, JWK), which would invite key confusion."""
    head = secret.lstrip()[:64]
    if head.startswith((b"-----BEGIN", b"ssh-", b"{")) or b"PUBLIC KEY" in secret:
        raise ValueError("auth.secret looks like a public key or JWK; HS* needs a random secret")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"auth.secret is shorter than {MIN_SECRET_BYTES} bytes")
    algs = FAMILY_ALGS["HMAC"].intersection(allowed)
    return VerifyKey(None, "HMAC", {a: HMACKey(secret, a) for a in algs}, _print(None, secret))


def public_key(key: object, kid: str | None, jwk_alg: str | None = None) -> VerifyKey:
    """A verification key for an RSA or EC public key object; raises ValueError when the key
    type, size or curve is not accepted."""
    checks: dict[str, SignatureCheck] = {}
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} needed)")
        family: Family = "RSA"
        for alg in FAMILY_ALGS["RSA"]:
            checks[alg] = PssKey(key) if alg == "PS256" else RSAKey(key, alg)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        ec_alg = _CURVE_ALG.get(key.curve.name)
        if ec_alg is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256, P-384)")
        family = "EC"
        checks[ec_alg] = ECKey(key, ec_alg)
    else:
        raise ValueError("not an RSA or EC public key")
    if jwk_alg is not None:
        checks = {a: c for a, c in checks.items() if a == jwk_alg}
        if not checks:
            raise ValueError(f"alg {jwk_alg} does not fit this {family} key")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return VerifyKey(kid, family, checks, _print(kid, der))


def _b64int(value: object) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("missing key parameter")
    return int.from_bytes(_b64(value), "big")


def _b64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def jwk_key(jwk: Mapping[str, Any]) -> VerifyKey:
    """A verification key from one public JWK (RSA or EC); raises ValueError for anything
    else: symmetric (``oct``) or private keys, keys not meant for signatures, bad values."""
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    alg = jwk.get("alg")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("alg is not a string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("key is not for signatures (use)")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key is not for verification (key_ops)")
    if "d" in jwk or "k" in jwk:
        raise ValueError("private or symmetric key material in a public key set")
    key: object
    if kty == "RSA":
        key = rsa.RSAPublicNumbers(_b64int(jwk.get("e")), _b64int(jwk.get("n"))).public_key()
    elif kty == "EC":
        curve = _JWK_CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise ValueError("EC curve not supported (P-256, P-384)")
        x, y = _b64int(jwk.get("x")), _b64int(jwk.get("y"))
        key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    else:
        raise ValueError(f"key type {kty!r} is not accepted (RSA, EC)")
    return public_key(key, kid, alg)


def pem_keys(data: bytes) -> list[VerifyKey]:
    """Keys from PEM data: public keys and certificates, one or more blocks."""
    keys = []
    for block in data.split(b"-----BEGIN ")[1:]:
        pem = b"-----BEGIN " + block
        if block.startswith(b"CERTIFICATE-----"):
            keys.append(public_key(x509.load_pem_x509_certificate(pem).public_key(), None))
        elif block.startswith(b"PUBLIC KEY-----") or block.startswith(b"RSA PUBLIC KEY-----"):
            keys.append(public_key(serialization.load_pem_public_key(pem), None))
        elif b"PRIVATE KEY-----" in block[:40]:
            raise ValueError("contains a private key; give the public key only")
    if not keys:
        raise ValueError("no PEM public key or certificate found")
    return keys


def jwks_keys(document: bytes) -> tuple[list[VerifyKey], list[str]]:
    """Keys of a JWKS document (or of a single JWK), and why others were skipped; raises
    ValueError when the document itself is not a JWK or JWK set."""
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if isinstance(data, dict) and "keys" in data:
        entries = data["keys"]
    elif isinstance(data, dict) and "kty" in data:
        entries = [data]
    else:
        raise ValueError("not a JWK set (no 'keys')")
    if not isinstance(entries, list):
        raise ValueError("'keys' is not a list")
    keys: list[VerifyKey] = []
    skipped: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped.append(f"keys[{i}]: not an object")
            continue
        try:
            keys.append(jwk_key(entry))
        except (ValueError, TypeError, OverflowError) as exc:
            skipped.append(f"keys[{i}]: {exc}")
    return keys, skipped


def load_key_file(path: str) -> list[VerifyKey]:
    """Keys from a PEM or JWK/JWKS file; raises ValueError naming the file and the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"auth.public_keys: cannot read {path}: {exc.strerror}") from None
    try:
        if data.lstrip().startswith(b"{"):
            keys, skipped = jwks_keys(data)
            if skipped:
                raise ValueError(skipped[0])
        else:
            keys = pem_keys(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"auth.public_keys: {path}: {exc}") from None
    if not keys:
        raise ValueError(f"auth.public_keys: {path}: no key")
    return keys
