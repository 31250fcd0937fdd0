"""Fixtures: the mock LLM service and gateways started as real processes over TCP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.otlp_receiver import OtlpReceiver
from tests.procs import Gateway, MockLLM


@pytest.fixture(scope="session")
def mock_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockLLM]:
    """One mock LLM service for the whole session (no per-token latency)."""
    proc = MockLLM(tmp_path_factory.mktemp("mock") / "mock.log")
    yield proc
    proc.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start a gateway on a policy given as YAML text (``{upstream}`` is substituted)."""
    started: list[Gateway] = []

    def start(
        policy_yaml: str,
        upstream: str = "",
        env: dict[str, str] | None = None,
        name: str = "policy.yaml",
    ) -> Gateway:
        path = tmp_path / name
        path.write_text(policy_yaml.replace("{upstream}", upstream))
        gw = Gateway(path, tmp_path / f"gateway-{len(started)}.log", env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver collecting the spans sent to ``otlp.url``."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()
