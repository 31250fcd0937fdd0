"""The verified-token cache: a token already verified costs a dict lookup.

Keyed by the token's own bytes, so a cached entry is only ever found again by the very same
bytes: a dict compares the whole key on a hash match, so no other token, however crafted, can
reach an entry (a digest key gave the same guarantee, up to collisions, but computing it cost
more than the rest of a cached verification: ~4 µs of SHA-256 through OpenSSL per request).
The cost is that up to ``cache_size`` verified tokens (each at most ``max_token_bytes``) stay
in memory until they expire or are evicted; only verified tokens get in, so a client cannot
fill the cache with tokens of its own making. Entries expire with the token (``exp`` +
leeway), the cache is bounded (least recently used entries go first), and it is cleared
whenever the key set rotates, so a token signed by a withdrawn key stops being accepted at once.
Failures are never cached: only tokens that passed every check.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.context import Identity
from gateway.telemetry import metrics

_HIT = metrics.fast_inc(metrics.CACHE_REQUESTS.labels("jwt", "hit"))
_MISS = metrics.fast_inc(metrics.CACHE_REQUESTS.labels("jwt", "miss"))


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
    """The cache key of ``token``: the token itself (see the module's docstring)."""
    return token


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
                _HIT(1)
                return entry
            del self._data[key]
        self.misses += 1
        _MISS(1)
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
