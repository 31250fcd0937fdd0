"""Why a token was refused: a closed set of reasons, each with its status and client message.

The reason is the ``reason`` label of ``gateway_auth_failures_total``; the message is what the
client reads in ``{"error": {"message": ...}}``. Messages are fixed strings: they never carry
the token, a signature, key material, a claim value or a library's own message.
"""

from __future__ import annotations

from typing import Literal

Reason = Literal[
    "missing_token",
    "token_too_large",
    "malformed",
    "alg_not_allowed",
    "crit",
    "unknown_kid",
    "key_mismatch",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "missing_exp",
    "wrong_issuer",
    "wrong_audience",
    "missing_sub",
    "unknown_tier",
    "insufficient_scope",
    "unavailable",
]

MESSAGES: dict[Reason, str] = {
    "missing_token": "missing bearer token",
    "token_too_large": "token too large",
    "malformed": "malformed token",
    "alg_not_allowed": "algorithm not allowed",
    "crit": "unsupported critical header",
    "unknown_kid": "unknown key id",
    "key_mismatch": "algorithm does not fit the key",
    "bad_signature": "bad signature",
    "expired": "token expired",
    "not_yet_valid": "token not yet valid",
    "missing_exp": "token has no expiry",
    "wrong_issuer": "wrong issuer",
    "wrong_audience": "wrong audience",
    "missing_sub": "missing sub",
    "unknown_tier": "token has no known tier",
    "insufficient_scope": "tier not allowed on this route",
    "unavailable": "identity provider keys are unavailable",
}

#: HTTP status of each reason: 401 unless listed here.
STATUS: dict[Reason, int] = {
    "unknown_tier": 403,
    "insufficient_scope": 403,
    "unavailable": 503,
}


class TokenError(Exception):
    """A token the gateway does not accept; ``reason`` is one of :data:`Reason`."""

    __slots__ = ("reason",)

    def __init__(self, reason: Reason) -> None:
        super().__init__(MESSAGES[reason])
        self.reason: Reason = reason

    @property
    def message(self) -> str:
        """The client-facing message."""
        return MESSAGES[self.reason]

    @property
    def status(self) -> int:
        """The HTTP status of the answer."""
        return STATUS.get(self.reason, 401)
