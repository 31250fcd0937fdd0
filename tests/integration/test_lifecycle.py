"""Hot reload (file change, ConfigMap symlink swap, SIGHUP) and graceful SIGTERM drain."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Gateway, MockLLM, wait_for

StartGateway = Callable[..., Gateway]


def policy(upstream: str, max_body: str) -> str:
    return (
        f"version: 1\nupstream: {{url: '{upstream}', timeout: 10s}}\n"
        f"max_body_bytes: {max_body}\ndrain_timeout: 5s\n"
    )


def post_size(gw: Gateway, size: int) -> int:
    return httpx.post(f"{gw.url}/echo/x", content=b"a" * size).status_code


def test_reload_on_file_change_and_broken_file_keeps_old(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(mock_llm.url, "1KiB"), mock_llm.url)
    assert post_size(gw, 500) == 200
    gw.policy.write_text(policy(mock_llm.url, "100"))
    assert wait_for(lambda: post_size(gw, 500) == 413), gw.log()
    assert gw.metric("gateway_config_reload_total", {"result": "success"}) == 1

    gw.policy.write_text("version: 1\nupstream: {url: nope\n  garbage: [")
    assert wait_for(lambda: gw.metric("gateway_config_reload_total", {"result": "failure"}) == 1)
    assert post_size(gw, 500) == 413 and post_size(gw, 50) == 200  # old policy still serves
    assert "policy reload failed" in gw.log()
    assert "invalid YAML" in gw.log()

    gw.policy.unlink()
    assert wait_for(lambda: gw.metric("gateway_config_reload_total", {"result": "failure"}) == 2)
    assert post_size(gw, 50) == 200


def test_reload_on_configmap_symlink_swap(
    start_gateway: StartGateway, mock_llm: MockLLM, tmp_path: Path
) -> None:
    # Kubernetes mounts ConfigMaps as policy.yaml -> ..data/policy.yaml, ..data -> ..2026_x;
    # an update writes a new directory and swaps the ..data link atomically.
    v1 = tmp_path / "..v1"
    v1.mkdir()
    (v1 / "policy.yaml").write_text(policy(mock_llm.url, "1KiB"))
    (tmp_path / "..data").symlink_to(v1.name)
    link = tmp_path / "policy.yaml"
    link.symlink_to("..data/policy.yaml")
    gw = Gateway(link, tmp_path / "gw.log")
    try:
        assert post_size(gw, 500) == 200
        v2 = tmp_path / "..v2"
        v2.mkdir()
        (v2 / "policy.yaml").write_text(policy(mock_llm.url, "100"))
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(v2.name)
        os.replace(tmp_link, tmp_path / "..data")
        assert wait_for(lambda: post_size(gw, 500) == 413), gw.log()
    finally:
        gw.stop()


def test_sighup_reloads(start_gateway: StartGateway, mock_llm: MockLLM) -> None:
    gw = start_gateway(policy(mock_llm.url, "1KiB"), mock_llm.url)
    # same size and mtime granularity aside, SIGHUP reloads without waiting for the poll
    gw.policy.write_text(policy(mock_llm.url, "200"))
    gw.signal(signal.SIGHUP)
    assert wait_for(lambda: post_size(gw, 500) == 413, timeout=3)


def slow_chat(gw: Gateway, words: str, latency: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A chat completion the mock answers slowly, in a thread; ``result["r"]`` when done."""
    result: dict[str, Any] = {}
    body = {"model": "m", "messages": [{"role": "user", "content": words}]}

    def run() -> None:
        result["r"] = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                                 headers={"X-Mock-Latency": latency}, timeout=10)  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_in_flight_request_finishes_across_reload(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(mock_llm.url, "1KiB"), mock_llm.url)
    t, result = slow_chat(gw, "a b c d", "0.4")
    time.sleep(0.3)
    assert gw.metric("gateway_requests_in_flight") == 1
    gw.policy.write_text(policy(mock_llm.url, "100"))
    gw.signal(signal.SIGHUP)
    t.join(10)
    assert result["r"].status_code == 200
    assert result["r"].json()["choices"][0]["message"]["content"] == "Echo: a b c d"


def test_sigterm_drains_in_flight_then_exits_zero(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(mock_llm.url, "1KiB"), mock_llm.url)
    t, result = slow_chat(gw, "a b c d e", "0.3")
    time.sleep(0.4)
    gw.signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connections while draining
        httpx.get(f"{gw.url}/echo/x", timeout=2)
    t.join(10)
    assert result["r"].status_code == 200, result
    assert gw.popen.wait(10) == 0
    assert "Traceback" not in gw.log()
