"""Tests of the deployment files in deploy/ (alert rules, dashboard, manifests, Dockerfile).

They run the real tools (promtool, hadolint, the Kubernetes schemas of kubernetes-validate)
offline; a missing tool is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def require_tool(name: str, install_hint: str) -> str:
    """Path of the executable ``name`` (the venv's scripts first, then PATH), or fail the test."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {install_hint}", pytrace=False)
    return found
