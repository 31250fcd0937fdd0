"""``gateway run --workers 2``: shared ports, shared limits in Redis, summed metrics, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import ROOT, Gateway, MockLLM, wait_for
from tests.redis_procs import RedisServer, redis_server

__all__ = ["redis_server"]  # the module-scoped fixture


def policy(state_url: str) -> str:
    return (
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{state_url}", key_prefix: workers}}\n'
        "rate_limits: {per_ip: 30/day}\n"
    )


def requests_by_worker(metrics_dir: Path, name: str = "http_requests_total") -> dict[str, float]:
    """Counter ``name`` as each worker's own file holds it."""
    out: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        total = sum(
            value
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
            if f'"{name}"' in key
        )
        out[path.stem.split("_")[1]] = total
    return out


def answered(gw: Gateway, status: str) -> float:
    """``http_requests_total`` with this status, summed, as ``/metrics`` shows it."""
    text = httpx.get(f"{gw.admin}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "http_requests_total" and sample.labels.get("status") == status
    )


def wait_workers_listening(gw: Gateway, workers: int = 2, timeout: float = 30.0) -> None:
    """Until every worker logged that it starts serving: its gRPC listener, when any, is up
    before that line, and its HTTP listeners listen a moment after it."""
    deadline = time.monotonic() + timeout
    while gw.log().count('"msg": "gateway started"') < workers:
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)
    time.sleep(0.5)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_pids(gw: Gateway) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(gw.popen.pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_two_workers_share_ports_limits_and_metrics(
    tmp_path: Path, mock_llm: MockLLM, redis_server: RedisServer
) -> None:
    metrics_dir = tmp_path / "metrics"
    path = tmp_path / "policy.yaml"
    path.write_text(policy(redis_server.url).replace("{upstream}", mock_llm.url))
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    gw = Gateway(path, tmp_path / "gateway.log", env, ["--workers", "2"])
    try:
        assert len(worker_pids(gw)) == 2
        wait_workers_listening(gw)
        # New connection each time: SO_REUSEPORT spreads them over both workers.
        codes = [httpx.get(f"{gw.url}/echo/x").status_code for _ in range(40)]
        assert codes.count(200) == 30 and codes.count(429) == 10  # one limit for both workers
        # Each worker writes its buffered metric updates every second: another worker's last
        # requests may take that long to reach the shared files and a scrape.
        assert wait_for(lambda: sum(requests_by_worker(metrics_dir).values()) == 40), (
            requests_by_worker(metrics_dir)
        )
        per_worker = requests_by_worker(metrics_dir)
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
        assert answered(gw, "200") == 30
        assert answered(gw, "429") == 10

        # A worker that dies is replaced; its counts stay in the sums.
        victim = min(worker_pids(gw))
        os.kill(victim, signal.SIGKILL)
        # One listing per check: with two, the first could still show the victim (not yet
        # reaped) and the second neither it nor its replacement (not yet started).
        deadline = time.monotonic() + 20
        pids = worker_pids(gw)
        while (len(pids) < 2 or victim in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = worker_pids(gw)
        assert len(pids) == 2 and victim not in pids, gw.log()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the new worker listens too
            if len(requests_by_worker(metrics_dir)) >= 2 and httpx.get(f"{gw.admin}/readyz"):
                break
            time.sleep(0.1)
        assert httpx.get(f"{gw.url}/echo/x").status_code == 429
        assert wait_for(lambda: answered(gw, "429") == 11), answered(gw, "429")
        # Answered just before the stop: a worker writes its buffered updates as it stops.
        assert httpx.get(f"{gw.url}/echo/x").status_code == 429
    finally:
        code = gw.stop()
    log = gw.log_path.read_text()
    assert code == 0, log
    assert sum(requests_by_worker(metrics_dir).values()) == 42
    assert '"workers stopped", "code": 0' in log


def test_memory_store_with_limits_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy("memory://").replace("{upstream}", "http://127.0.0.1:9"))
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 1
    assert "--workers > 1 needs a shared state store" in run.stderr


def test_worker_failing_at_start_stops_the_supervisor(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    # A secret that is not in the environment: every worker fails while building its pipeline.
    path.write_text(
        'version: 1\nupstream: {url: "http://127.0.0.1:9"}\n'
        "auth: {algorithms: [HS256], secret: {env: GATEWAY_TEST_MISSING_SECRET}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TEST_MISSING_SECRET"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert time.monotonic() - started < 30


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, mock_llm: MockLLM) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f'version: 1\nupstream: {{url: "{mock_llm.url}"}}\n')
    gw = Gateway(path, tmp_path / "gateway.log", None, ["--workers", "2"])
    try:
        pids = worker_pids(gw)
        assert len(pids) == 2
        gw.popen.kill()  # SIGKILL: the supervisor forwards nothing
        gw.popen.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            time.sleep(0.1)
    finally:
        gw.stop()
