"""The alert rules: promtool accepts them, their unit tests pass, every alert is complete and
tested, every metric they (and the dashboard) use is one the gateway defines, and the
Kubernetes PrometheusRule carries exactly the same groups."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import gateway.telemetry.metrics as gateway_metrics
import gateway.telemetry.request_metrics  # noqa: F401  (registers the per-request metrics)
from tests.deploy import DEPLOY, ROOT, require_tool
from tests.deploy.promql import defined_names, metric_names

ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
PROMETHEUS_RULE = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"
RUNBOOK = ROOT / "docs" / "metrics-and-alerts.md"

PROMTOOL_HINT = "apt-get install prometheus (scripts/test.sh does it), which ships promtool"

EXPECTED_LATER: set[str] = set()
"""Metric names used by the rules or the dashboard that another change is about to define."""

NOT_GATEWAY = {"up"}
"""Series Prometheus makes itself."""

SEVERITIES = {"critical", "warning", "info"}


def _alert_rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                yield rule


def _dashboard_exprs() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        found = re.match(r"\s*label_values\((.*),\s*\w+\)\s*$", text)
        if found:
            yield found.group(1)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool", PROMTOOL_HINT)
    done = _run(promtool, "check", "rules", str(ALERTS.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests() -> None:
    promtool = require_tool("promtool", PROMTOOL_HINT)
    done = _run(promtool, "test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_seed_alerts_are_all_there() -> None:
    names = {rule["alert"] for rule in _alert_rules()}
    assert names == {
        "GatewayTargetDown",
        "GatewayHighErrorRate",
        "GatewayConfigReloadFailed",
        "GatewayLayer3LatencyHigh",
        "GatewayLayer4LatencyHigh",
        "GatewayAddedLatencyHigh",
        "GatewayStateStoreErrors",
        "GatewayStateStoreDegraded",
        "GatewayJwtCacheHitRateLow",
        "GatewayLLMCostOverBudget",
        "GatewayGuardrailBlockSpike",
    }


@pytest.mark.parametrize("rule", list(_alert_rules()), ids=lambda r: r["alert"])
def test_alert_is_complete(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), "every alert states its `for:`"
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    runbook = annotations["runbook"]
    assert runbook == f"docs/metrics-and-alerts.md#{rule['alert'].lower()}"
    headings = {
        line.lstrip("#").strip().lower()
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    assert rule["alert"].lower() in headings, f"no '### {rule['alert']}' section in {RUNBOOK}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - fired == set(), "alerts never shown firing in alerts_test.yaml"
    assert names - quiet == set(), "alerts never shown quiet in alerts_test.yaml"


def test_promql_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, layer) (rate(a_bucket{layer="x", b=~"$v"}'
        "[$__rate_interval]))) > 0.4 and on (job) b_total offset 5m unless time() - c > 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def _used_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for rule in _alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in _dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def test_every_metric_used_is_defined_by_the_gateway() -> None:
    defined = defined_names(gateway_metrics.REGISTRY)
    used = _used_names()
    assert "http_requests_total" in used and "gateway_config_reload_total" in used
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in defined and name not in NOT_GATEWAY and name not in EXPECTED_LATER
    }
    assert missing == {}, "metrics used in deploy/ that the gateway does not define"


def test_expected_later_is_still_missing() -> None:
    """Keeps EXPECTED_LATER honest: a name that has landed must leave the list."""
    landed = EXPECTED_LATER & defined_names(gateway_metrics.REGISTRY)
    assert landed == set(), f"now defined by the gateway, remove from EXPECTED_LATER: {landed}"
    assert set(_used_names()) >= EXPECTED_LATER, "EXPECTED_LATER lists a name nothing uses"


def _generator() -> ModuleType:
    path = DEPLOY / "gen_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_generated_from_alerts() -> None:
    generated = _generator().render(ALERTS.read_text())
    assert PROMETHEUS_RULE.read_text() == generated, (
        "deploy/k8s/base/prometheusrule.yaml is stale: run python deploy/gen_prometheusrule.py"
    )
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_generator_check_mode(tmp_path: Path) -> None:
    module = _generator()
    assert module.main(["--check"]) == 0
    with pytest.raises(ValueError, match="groups"):
        module.render("rules: []\n")


def test_every_metric_is_documented() -> None:
    text = RUNBOOK.read_text()
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in gateway_metrics.REGISTRY.collect()
    }
    undocumented = sorted(n for n in families | EXPECTED_LATER if f"| `{n}` |" not in text)
    assert undocumented == [], f"add them to the metric tables of {RUNBOOK.relative_to(ROOT)}"
