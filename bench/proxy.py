"""Pass-through gateway vs direct upstream vs nginx as a reverse proxy, in one run.

    python -m bench.proxy [--duration 10] [--rate 500] [--write-readme]

The upstream is nginx answering ``{"ok":true}``; the gateway runs ``policies/minimal.yaml``
semantics (no auth, limits or guardrails) as one uvicorn worker. Each target gets GET and
POST of a 1 KB chat body from wrk with 32 connections, then a fixed 500 req/s open-loop run
for the latency the gateway adds. RSS is read idle and at its peak under load.

Targets (issue: core): throughput ≥ 10% of nginx's, p99 added ≤ 2 ms at 500 req/s,
idle RSS ≤ 100 MB. Needs ``wrk`` and ``nginx`` (``apt-get install wrk nginx-light``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._util import (
    free_port,
    json_body,
    load_get_post,
    rss_mb,
    run_wrk,
    start_nginx,
    stop_process,
    wait_port,
    write_readme_section,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "proxy.json"
PATH = "/v1/chat/completions"


def gateway_policy(
    port: int,
    admin: int,
    upstream_port: int,
    policy_extra: str = "",
    replace_telemetry: bool = False,
) -> str:
    """The bench gateway's policy text: listeners, the upstream, ``telemetry`` at ``warning``
    unless ``replace_telemetry`` says ``policy_extra`` brings its own, then ``policy_extra``."""
    telemetry = "" if replace_telemetry else "telemetry: {log_level: warning}\n"
    return (
        f"version: 1\nlisten: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n"
        f"upstream: {{url: 'http://127.0.0.1:{upstream_port}'}}\n" + telemetry + policy_extra
    )


def start_gateway(
    upstream_port: int,
    workdir: Path,
    policy_extra: str = "",
    replace_telemetry: bool = False,
    extra_args: list[str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``gateway run`` on a free port in front of ``upstream_port``; returns (process, port).

    The policy has no auth, limits or guardrails, and logs at ``warning`` (no access lines)
    unless ``replace_telemetry`` says ``policy_extra`` brings its own ``telemetry`` section."""
    port, admin = free_port(), free_port()
    policy = workdir / "policy.yaml"
    policy.write_text(gateway_policy(port, admin, upstream_port, policy_extra, replace_telemetry))
    log = (workdir / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(policy), *(extra_args or [])],
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    wait_port(port)
    return proc, port


class PeakRss:
    """Samples a process's RSS every 100 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(duration: int, rate: int) -> dict[str, Any]:
    """Run the whole comparison; returns the results document."""
    body = json_body(1024)
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "connections": 32,
        "duration_s": duration,
    }
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        up_port, ngx_port = free_port(), free_port()
        (work / "up").mkdir()
        (work / "ngx").mkdir()
        upstream = start_nginx(up_port, "static", None, work / "up")
        nginx = start_nginx(ngx_port, "proxy", up_port, work / "ngx")
        wait_port(up_port)
        wait_port(ngx_port)
        gateway, gw_port = start_gateway(up_port, work)
        try:
            time.sleep(1)
            out["gateway_rss_idle_mb"] = round(rss_mb(gateway.pid), 1)
            targets = {"direct": up_port, "nginx": ngx_port, "gateway": gw_port}
            loads: dict[str, Any] = {}
            for name, port in targets.items():
                url = f"http://127.0.0.1:{port}{PATH}"
                if name == "gateway":
                    with PeakRss(gateway.pid) as peak:
                        loads[name] = load_get_post(url, duration, body)
                    out["gateway_rss_load_mb"] = round(peak.peak, 1)
                else:
                    loads[name] = load_get_post(url, duration, body)
            out["throughput"] = loads
            fixed: dict[str, Any] = {}
            for name in ("direct", "gateway"):
                url = f"http://127.0.0.1:{targets[name]}{PATH}"
                run_wrk(url, duration_s=2, rate=rate, method="POST", body=body)  # warm-up
                fixed[name] = run_wrk(url, duration_s=duration, rate=rate, method="POST", body=body)
            out["fixed_rate"] = {"rate": rate, **fixed}
        finally:
            for proc in (gateway, nginx, upstream):
                stop_process(proc)
    return out


def summarise(res: dict[str, Any]) -> list[str]:
    """The results as Markdown lines: a table with ratios and the targets checked."""
    t = res["throughput"]
    lines = [
        f"Measured {res['date']} on {res['nproc']} cores, wrk -c32 -t2,"
        f" {res['duration_s']} s a run, 1 KB JSON POST body, 1 uvicorn worker."
        " Command: `python -m bench.proxy`.",
        "",
        "| target | GET req/s | GET p50 / p99 ms | POST req/s | POST p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, r in t.items():
        g, p = r["GET"], r["POST"]
        lines.append(
            f"| {name} | {g['rps']:.0f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} | {p['rps']:.0f} |"
            f" {p['p50_ms']:.2f} / {p['p99_ms']:.2f} |"
        )
    ratio_get = t["gateway"]["GET"]["rps"] / t["nginx"]["GET"]["rps"]
    ratio_post = t["gateway"]["POST"]["rps"] / t["nginx"]["POST"]["rps"]
    f = res["fixed_rate"]
    added_p50 = f["gateway"]["p50_ms"] - f["direct"]["p50_ms"]
    added_p99 = f["gateway"]["p99_ms"] - f["direct"]["p99_ms"]
    ok = "✅"
    no = "❌"
    lines += [
        "",
        "| check | target | measured |",
        "|---|---|---|",
        f"| gateway / nginx throughput | ≥ 10% | GET {ratio_get:.1%}, POST {ratio_post:.1%}"
        f" {ok if min(ratio_get, ratio_post) >= 0.10 else no} |",
        f"| added latency at {f['rate']} req/s (POST) | p99 ≤ 2 ms | p50 {added_p50:+.2f} ms,"
        f" p99 {added_p99:+.2f} ms {ok if added_p99 <= 2 else no} |",
        f"| gateway RSS idle | ≤ 100 MB | {res['gateway_rss_idle_mb']} MB"
        f" {ok if res['gateway_rss_idle_mb'] <= 100 else no} |",
        f"| gateway RSS under load | (reported) | {res['gateway_rss_load_mb']} MB |",
    ]
    return lines


def main() -> None:
    """Run, print, save; optionally update the README."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    res = measure(args.duration, args.rate)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    lines = summarise(res)
    print("\n".join(lines))
    if args.write_readme:
        write_readme_section("<!-- bench:start -->", "<!-- bench:end -->", lines)


if __name__ == "__main__":
    main()
