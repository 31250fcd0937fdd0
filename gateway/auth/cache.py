"""The verified-token cache: a token already verified costs a hash and a dict lookup.

Keyed by the SHA-256 digest of the token's bytes (the token itself is never stored), so a
cached entry is only ever found again by the very same bytes (SHA-256 rather than BLAKE2b:
with the CPU's SHA extensions it measured ~30% faster on a 600-byte token here). Entries
expire with the token (``exp`` + leeway), the cache is bounded (least recently used entries
go first), and it is cleared whenever the key set rotates, so a token signed by a withdrawn
key stops being accepted at once. Failures are never cached: only tokens that passed every check.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256

from gateway.context import Identity
from gateway.telemetry import metrics

_HIT = metrics.CACHE_REQUESTS.labels("jwt", "hit")
_MISS = metrics.CACHE_REQUESTS.labels("jwt", "miss")


@dataclass(slots=True, frozen=True)
class Verified:
    """A verified token: the identity and its pre-encoded forward header values."""

    identity: Identity
    """Shared by every request presenting this token: treat it as read-only."""
    sub: bytes
    tier: bytes
    claims_json: bytes | None
    """All verified claims as one compact JSON object, when some route forwards them."""
    deadline: float
    """Unix time after which the token is expired (``exp`` + leeway)."""
    from_jwks: bool
    """Verified with a JWKS key: only usable while that key set is not stale."""


def token_key(token: bytes) -> bytes:
    """The cache key of ``token``: its SHA-256 digest."""
    return sha256(token).digest()


class TokenCache:
    """Bounded LRU of verified tokens that expire with the tokens; counts hits and misses."""

    __slots__ = ("_data", "_now", "hits", "misses", "size")

    def __init__(self, size: int, now: Callable[[], float] = time.time) -> None:
        self.size = size
        self._now = now
        self._data: OrderedDict[bytes, Verified] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Verified | None:
        """The entry for ``key`` if present and not expired; counts a hit or a miss."""
        entry = self._data.get(key)
        if entry is not None:
            if entry.deadline > self._now():
                self._data.move_to_end(key)
                self.hits += 1
                _HIT.inc()
                return entry
            del self._data[key]
        self.misses += 1
        _MISS.inc()
        return None

    def put(self, key: bytes, entry: Verified) -> None:
        """Remember a verified token, evicting the least recently used one when full."""
        data = self._data
        data[key] = entry
        data.move_to_end(key)
        while len(data) > self.size:
            data.popitem(last=False)

    def discard(self, key: bytes) -> None:
        """Forget one token (e.g. when its JWKS key set went stale)."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Forget every token (the key set rotated)."""
        self._data.clear()
