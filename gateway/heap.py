"""The garbage collector set up for a long-running proxy.

A full (generation 2) collection walks every container object of the process: after start-up
some 75,000 (modules, the policy, compiled rules, the OpenTelemetry and gRPC libraries), tens
of milliseconds on a small VM, charged to whichever request allocates the object that tips the
threshold. Those were the p99 spikes of ``python -m bench.speed``'s fixed-rate run. Objects
alive when serving starts live as long as the process, so they are frozen (``gc.freeze``): the
collector no longer walks them and a full collection walks only what came later. Frozen
objects are still freed by reference counting; only reference cycles among them would stay,
so when a reload retires a pipeline the heap is unfrozen, collected once and frozen again.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("gateway.heap")


def freeze() -> None:
    """Collect, then move every object alive now out of the collector's sight."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap frozen",
        extra={
            "objects": gc.get_freeze_count(),
            "ms": round(1000 * (time.perf_counter() - started)),
        },
    )


def refreeze() -> None:
    """After a pipeline is retired: let the collector see everything once (so the retired
    pipeline's cycles are freed), then freeze what is left."""
    gc.unfreeze()
    freeze()
