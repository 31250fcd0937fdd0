"""The collector set-up: frozen start-up objects, and a refreeze that frees retired cycles."""

from __future__ import annotations

import gc
import weakref

from gateway import heap


class _Node:
    other: object = None


def test_frozen_objects_leave_the_collectors_sight_until_a_refreeze() -> None:
    node = _Node()
    node.other = node  # a cycle: only the collector can free it
    ref = weakref.ref(node)
    try:
        heap.freeze()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: a full collection does not walk it
        heap.refreeze()  # what a retired pipeline goes through
        assert ref() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
