"""A short locust run through the real stack: Redis, the mock LLM, the gateway."""

from __future__ import annotations

from pathlib import Path

from loadtests.run import run


def test_locust_smoke(tmp_path: Path) -> None:
    summary = run(users=20, duration=20, out=tmp_path)
    assert summary["locust_requests"] > 200, summary
    assert summary["checks"] == {
        "no_5xx": True,
        "no_locust_failures": True,
        "counts_agree": True,
        "limits_honoured": True,
        "guardrail_fired": True,
        "auth_refusals_agree": True,
    }, summary
    assert (tmp_path / "report.html").stat().st_size > 0
    assert (tmp_path / "locust_stats.csv").exists()
