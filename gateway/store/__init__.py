"""Rate-limit and budget state: the in-process store (``memory://``, the default) and Redis.

``base`` defines the batch-of-counters contract and the algorithm, ``memory`` and ``redis``
implement it (``script`` is the Lua side), ``breaker`` keeps a Redis outage from slowing
requests down, and ``state`` applies ``state.on_error``. Only ``redis`` imports redis-py.
"""

from __future__ import annotations

from gateway.store.base import Counter, Store, StoreError, Verdict
from gateway.store.memory import MemoryStore
from gateway.store.state import SharedState, StateUnavailable

__all__ = [
    "Counter",
    "MemoryStore",
    "SharedState",
    "StateUnavailable",
    "Store",
    "StoreError",
    "Verdict",
]
