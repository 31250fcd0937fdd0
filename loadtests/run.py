"""Run the load test locally: Redis, the mock LLM, the gateway, then locust headless.

    python -m loadtests.run [--users 40] [--duration 60] [--out loadtests/results]

Writes locust's CSV files and HTML report to ``--out`` plus ``summary.json``, and checks:
no 5xx, limits honoured (each free player admitted at most its per-minute limit), injection
attempts blocked by the guardrail, and the gateway's own metrics agreeing with locust's counts.
Exits 1 when a check fails. Needs ``redis-server`` on the PATH.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
WEIGHTS = {"FreePlayer": 4, "ProUser": 2, "StreamingChat": 2, "Injector": 1, "BrokenClient": 1}
FREE_LIMIT_PER_MINUTE = 20


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


def _metrics(admin: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{admin}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _sum(metrics: dict[str, float], prefix: str, *needles: str) -> float:
    return sum(
        v for k, v in metrics.items() if k.startswith(prefix + "{") and all(n in k for n in needles)
    )


def run(users: int, duration: int, out: Path) -> dict[str, Any]:
    """Start everything, load it, collect and check; returns the summary."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loadtest-"))
    env = {
        **os.environ,
        "GATEWAY_JWT_SECRET": secrets.token_urlsafe(32),
        "LOADTEST_STATS_JSON": str(out / "final_stats.json"),
    }
    redis_port, mock_port, gw_port, admin_port = _port(), _port(), _port(), _port()
    procs: list[subprocess.Popen[bytes]] = []
    log = (out / "services.log").open("wb")
    try:
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(work),
                ],
                stdout=log,
                stderr=log,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "mock-llm",
                    "--listen",
                    f"127.0.0.1:{mock_port}",
                    "--token-latency",
                    "5ms",
                ],
                stdout=log,
                stderr=log,
                cwd=ROOT,
            )
        )
        policy = (HERE / "policy.yaml").read_text()
        policy = policy.replace("{upstream}", f"http://127.0.0.1:{mock_port}")
        policy = policy.replace("{state}", f"redis://127.0.0.1:{redis_port}/0")
        (work / "policy.yaml").write_text(policy)
        _wait(f"http://127.0.0.1:{mock_port}/health")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "run",
                    "-c",
                    str(work / "policy.yaml"),
                    "--listen",
                    f"127.0.0.1:{gw_port}",
                    "--admin-listen",
                    f"127.0.0.1:{admin_port}",
                ],
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        )
        admin = f"http://127.0.0.1:{admin_port}"
        _wait(f"{admin}/readyz")
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(HERE / "locustfile.py"),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{duration}s",
            "--stop-timeout",
            "10",
            "--host",
            f"http://127.0.0.1:{gw_port}",
            "--csv",
            str(out / "locust"),
            "--html",
            str(out / "report.html"),
            "--only-summary",
            "--exit-code-on-error",
            "0",
        ]
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=log, timeout=duration + 120)
        metrics = _metrics(admin)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    stats = json.loads((out / "final_stats.json").read_text())
    return check(stats, metrics, users, duration)


def check(
    stats: dict[str, dict[str, int]], metrics: dict[str, float], users: int, duration: int
) -> dict[str, Any]:
    """Compare locust's counts with the gateway's metrics and the policy's limits."""
    total = stats["Aggregated"]["requests"]
    gateway_total = _sum(metrics, "http_requests_total")
    five_xx = _sum(metrics, "http_requests_total", 'status="5')
    free_users = math.ceil(users * WEIGHTS["FreePlayer"] / sum(WEIGHTS.values()))
    free = stats.get("free chat", {"requests": 0})["requests"]
    free_429 = _sum(metrics, "gateway_ratelimit_rejections_total", 'scope="tier"')
    # The sliding window counter admits at most the limit per aligned minute, so a run that
    # crosses a minute edge may see one more window's worth (docs: rate limits).
    allowed_free = free_users * FREE_LIMIT_PER_MINUTE * (math.ceil(duration / 60) + 1)
    injections = stats.get("injection", {"requests": 0})["requests"]
    blocked = _sum(metrics, "gateway_guardrail_actions_total", 'stage="input"', 'action="block"')
    bad_tokens = sum(
        stats.get(n, {"requests": 0})["requests"]
        for n in ("expired token", "garbage token", "missing token")
    )
    summary: dict[str, Any] = {
        "locust_requests": total,
        "locust_failures": stats["Aggregated"]["failures"],
        "gateway_requests": gateway_total,
        "gateway_5xx": five_xx,
        "gateway_401": _sum(metrics, "http_requests_total", 'status="401"'),
        "bad_token_requests": bad_tokens,
        "free_requests": free,
        "free_rejected": free_429,
        "free_admitted_max": allowed_free,
        "injections": injections,
        "injections_blocked": blocked,
        "gateway_400": _sum(metrics, "http_requests_total", 'status="400"'),
    }
    summary["checks"] = {
        "no_5xx": five_xx == 0,
        "no_locust_failures": summary["locust_failures"] == 0,
        "counts_agree": gateway_total == total,
        "limits_honoured": free_429 > 0 and free - free_429 <= allowed_free,
        # one prompt may hit several rules: each hit is counted, the answer is one 400
        "guardrail_fired": injections > 0
        and summary["gateway_400"] == injections
        and blocked >= injections,
        "auth_refusals_agree": summary["gateway_401"] == bad_tokens,
    }
    return summary


def main() -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--duration", type=int, default=60)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    summary = run(args.users, args.duration, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    sys.exit(0 if all(summary["checks"].values()) else 1)


if __name__ == "__main__":
    main()
