"""The Kubernetes manifests: valid against the Kubernetes schemas (offline, strict: unknown
fields are errors), complete kustomizations, a policy the gateway's loader accepts, and the
places where manifests and policy must agree (ports, secrets, drain time, selectors)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.policy import Policy, load_policy_text
from tests.deploy import DEPLOY

BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
REDIS_VALUES = DEPLOY / "k8s" / "redis" / "values.yaml"

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
"""Prometheus Operator kinds: no schema in kubernetes-validate, checked by hand below."""
K8S_VERSIONS = ("1.30.0", "latest")
"""The oldest supported version (preStop `sleep`, ContainerResource HPA metrics), the newest."""


def _kubernetes_validate() -> ModuleType:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[dev]'", pytrace=False)
    module: ModuleType = kubernetes_validate
    return module


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _base_manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            yield f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc


MANIFESTS = dict(_base_manifests())


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in MANIFESTS.values()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(name: str) -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _policy() -> Policy:
    return load_policy_text(_one("ConfigMap")["data"]["policy.yaml"], "configmap.yaml")


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def _validate(doc: dict[str, Any]) -> None:
    kv = _kubernetes_validate()
    for version in K8S_VERSIONS:
        wanted = kv.latest_version() if version == "latest" else version
        kv.validate(doc, wanted, strict=True)


# -- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [d for d in MANIFESTS.values() if d["kind"] not in CRD_KINDS],
    ids=[k for k, d in MANIFESTS.items() if d["kind"] not in CRD_KINDS],
)
def test_manifest_matches_kubernetes_schema(doc: dict[str, Any]) -> None:
    _validate(doc)


def test_schema_validation_catches_a_typo() -> None:
    """The validation is strict: a misspelt field is an error, not ignored."""
    kv = _kubernetes_validate()
    broken = yaml.safe_load(yaml.safe_dump(_one("Deployment")))
    containers = broken["spec"]["template"]["spec"]["containers"]
    next(c for c in containers if c["name"] == "gateway")["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_servicemonitor() -> None:
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    selector = spec["selector"]["matchLabels"]
    services = [
        d
        for d in MANIFESTS.values()
        if d["kind"] == "Service" and selector.items() <= d["metadata"].get("labels", {}).items()
    ]
    assert len(services) == 1, "the ServiceMonitor must select exactly the admin Service"
    service = services[0]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"], "at least one endpoint"
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
    # the alert rules select job="gateway": the jobLabel of the selected Service must say so
    assert service["metadata"]["labels"][spec["jobLabel"]] == "gateway"
    admin = next(p for p in service["spec"]["ports"] if p["name"] == "admin")
    assert admin["targetPort"] == "admin"


def test_prometheusrule_shape() -> None:
    rule = _one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"]
    groups = rule["spec"]["groups"]
    assert groups
    for group in groups:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r)
            assert r["expr"].strip()
            assert re.fullmatch(r"\d+[smh]", str(r.get("for", "0m")))


# -- kustomize -----------------------------------------------------------------------------


def _kustomization(folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert doc["kind"] == "Kustomization"
    return doc


def test_base_kustomization_lists_every_manifest() -> None:
    listed = _kustomization(BASE)["resources"]
    for entry in listed:
        assert (BASE / entry).is_file(), f"{entry} listed in the base but missing"
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, "a manifest in base/ is not listed in its kustomization"


def test_overlay_kustomization() -> None:
    overlay = _kustomization(OVERLAY)
    for entry in overlay["resources"]:
        target = (OVERLAY / entry).resolve()
        assert target.is_dir() and (target / "kustomization.yaml").is_file(), entry
    assert (OVERLAY / "../../base").resolve() == BASE.resolve()
    assert overlay["namespace"] and overlay["namePrefix"]
    assert {i["name"] for i in overlay["images"]} == {"gateway", "ghcr.io/example/dialogue"}
    names = {d["metadata"]["name"] for d in MANIFESTS.values()}
    for patch in overlay["patches"]:
        if "path" in patch:
            doc = yaml.safe_load((OVERLAY / patch["path"]).read_text())
            assert doc["metadata"]["name"] in names, f"{patch['path']} patches nothing"
        else:
            assert patch["target"]["name"] in names and patch["patch"].strip()


def test_overlay_builds_and_validates() -> None:
    """Build the overlay with kustomize (kubectl's) and validate what comes out."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed; structure checked above")
    done = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(built) == len(MANIFESTS)
    for doc in built:
        assert doc["metadata"]["namespace"] == "game-prod"
        assert doc["metadata"]["name"].startswith("prod-")
        if doc["kind"] not in CRD_KINDS:
            _validate(doc)
    deployment = next(d for d in built if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 4
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "prod-gateway-policy"
    images = {c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert images["gateway"] == "registry.example.com/platform/gateway:0.1.0"


# -- the policy and the pod agree ----------------------------------------------------------


def test_configmap_policy_passes_the_gateway_loader() -> None:
    policy = _policy()
    assert policy.listen == "0.0.0.0:8080"
    assert policy.state.url.startswith("redis+sentinel://")
    assert urlsplit(policy.upstream.url).hostname == "127.0.0.1", "the app is in the same pod"


def test_gateway_container_matches_the_policy() -> None:
    policy = _policy()
    gateway = _container("gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["http"] == _port(policy.listen)
    args = gateway["args"]
    assert args[:3] == ["run", "-c", "/etc/gateway/policy.yaml"]
    admin = args[args.index("--admin-listen") + 1]
    assert admin.startswith("0.0.0.0:") and ports["admin"] == _port(admin)
    mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
    assert "subPath" not in mounts["/etc/gateway"], "subPath mounts never see ConfigMap updates"
    volume = next(
        v
        for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mounts["/etc/gateway"]["name"]
    )
    assert volume["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert "policy.yaml" in _one("ConfigMap")["data"]


def test_secrets_come_from_a_secret() -> None:
    text = _one("ConfigMap")["data"]["policy.yaml"]
    wanted = set(re.findall(r"\{env:\s*([A-Z0-9_]+)\}", text))
    assert "GATEWAY_JWT_SECRET" in wanted
    env = {e["name"]: e for e in _container("gateway")["env"]}
    for name in wanted:
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
        assert "value" not in env[name]


def test_probes_and_draining() -> None:
    gateway = _container("gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pod = _one("Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    gateway_sleep = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    app_sleep = _container("app")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < gateway_sleep <= app_sleep, "the app must outlive the gateway's last forward"
    assert gateway_sleep + _policy().drain_timeout < grace


def test_gateway_security_context() -> None:
    context = _container("gateway")["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    resources = _container("gateway")["resources"]
    assert resources["requests"] and resources["limits"]["memory"]


def test_services_select_the_pods_and_expose_only_the_gateway() -> None:
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    gateway_ports = {p["name"] for p in _container("gateway")["ports"]}
    assert "ports" not in _container("app"), "the app listens on loopback only"
    for doc in MANIFESTS.values():
        if doc["kind"] != "Service":
            continue
        assert doc["spec"]["selector"].items() <= pod_labels.items()
        for port in doc["spec"]["ports"]:
            assert port["targetPort"] in gateway_ports
    client = _one("Service", "dialogue")
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["http"]


def test_pdb_hpa_and_networkpolicy_point_at_the_deployment() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        doc = _one(kind)
        key = "podSelector" if kind == "NetworkPolicy" else "selector"
        assert doc["spec"][key]["matchLabels"].items() <= pod_labels.items(), kind
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    containers = {c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "ContainerResource":
            assert metric["containerResource"]["container"] in containers
    assert _policy().state.replicas == hpa["spec"]["minReplicas"]
    policy = _one("NetworkPolicy")["spec"]
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {"http", "admin"}


def test_redis_values_match_the_state_url() -> None:
    values = yaml.safe_load(REDIS_VALUES.read_text())
    assert values["sentinel"]["enabled"] is True
    url = urlsplit(_policy().state.url)
    assert url.path.strip("/").split("/")[0] == values["sentinel"]["masterSet"]
    assert url.port == 26379
    assert url.hostname is not None and url.hostname.startswith("redis.redis.svc")
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for key, value in values["networkPolicy"]["ingressNSPodMatchLabels"].items():
        assert pod_labels[key] == value, "the gateway pods must carry the Redis client label"
