"""How the tracer sets up the process: GIL slices only while spans are exported."""

from __future__ import annotations

import sys

from gateway.policy.sections import TelemetryConfig
from gateway.telemetry.tracing import GIL_SWITCH_INTERVAL, Tracing


def test_exporting_shortens_the_gil_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        Tracing(TelemetryConfig())  # no endpoint: nothing is exported, nothing changes
        assert sys.getswitchinterval() == before
        tracing = Tracing(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"))
        assert tracing.exporting
        assert sys.getswitchinterval() == GIL_SWITCH_INTERVAL < before
        tracing.shutdown()
    finally:
        sys.setswitchinterval(before)
