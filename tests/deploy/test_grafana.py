"""The Grafana dashboard: importable JSON, one data source input, the rows the operators
expect, and well-formed panels. (Its metric names are checked in test_prometheus.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The parsed dashboard."""
    parsed: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return parsed


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def test_dashboard_header(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["id"] is None, "an exported dashboard carries no database id"
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"


def test_rows_cover_the_operators_questions(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == [
        "Service health",
        "Latency by route",
        "Limits",
        "Guardrails",
        "Tokens and cost",
        "Auth",
        "Upstream",
        "Config reloads",
    ]


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in _panels(dashboard["panels"]):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            assert "$namespace" in target["expr"] and "$job" in target["expr"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_required_series_are_charted(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", []))
    for needle in (
        "rate(http_requests_total",
        "active_connections",
        "up{",
        "histogram_quantile(0.5, sum by (le, endpoint) (rate(http_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, endpoint) (rate(http_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, endpoint) (rate(http_request_duration_seconds_bucket",
        "sum by (le, layer) (rate(ai_inference_latency_seconds_bucket",
        "sum by (scope) (rate(gateway_ratelimit_rejections_total",
        "sum by (stage, action) (rate(gateway_guardrail_actions_total",
        "sum by (model, type) (rate(llm_tokens_total",
        "sum by (model, tier) (rate(llm_cost_usd_total",
        "cost_per_request_usd_bucket",
        "gateway_auth_failures_total",
        "gateway_upstream_errors_total",
        "gateway_config_reload_total",
    ):
        assert needle in exprs, needle
