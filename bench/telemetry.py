"""Requests/s and added latency with telemetry off, on at sampling 1.0, and on at 0.1.

    python -m bench.telemetry [--duration 8] [--rate 500]

"Off" has no OTLP endpoint (trace ids are still propagated, metrics still counted); "on"
exports spans to a local OTLP/HTTP sink that answers 200 to everything. Each run is the
gateway in front of nginx answering ``{"ok":true}``, wrk -c32, POST of a 1 KB JSON body,
then a fixed-rate open-loop run for the latency. Results: ``bench/results/telemetry.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench._util import free_port, json_body, run_wrk, start_nginx, stop_process, wait_port
from bench.proxy import ROOT, start_gateway

RESULTS = ROOT / "bench" / "results" / "telemetry.json"


class _Sink(BaseHTTPRequestHandler):
    # Keep-alive, as a real collector: an HTTP/1.0 sink made the exporter open a connection
    # for every batch, a cost the gateway would not pay in production.
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def measure(duration: int, rate: int) -> dict[str, Any]:
    """Run every configuration against one nginx upstream and one OTLP sink."""
    sink_port = free_port()
    sink = ThreadingHTTPServer(("127.0.0.1", sink_port), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    body = json_body(1024)
    configs = {
        "off": "",
        "on, sample 1.0": f"telemetry: {{otlp_endpoint: 'http://127.0.0.1:{sink_port}', "
        "sample_ratio: 1.0, log_level: warning}\n",
        "on, sample 0.1": f"telemetry: {{otlp_endpoint: 'http://127.0.0.1:{sink_port}', "
        "sample_ratio: 0.1, log_level: warning}\n",
    }
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        work = Path(tmp)
        up_port = free_port()
        (work / "up").mkdir()
        upstream = start_nginx(up_port, "static", None, work / "up")
        wait_port(up_port)
        try:
            for name, extra in configs.items():
                gdir = work / name.replace(" ", "_").replace(",", "")
                gdir.mkdir()
                # the base policy sets telemetry itself: replace it when the config has its own
                gateway, port = start_gateway(up_port, gdir, extra, replace_telemetry=bool(extra))
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                try:
                    run_wrk(url, duration_s=1, method="POST", body=body)
                    load = run_wrk(url, duration_s=duration, method="POST", body=body)
                    fixed = run_wrk(url, duration_s=duration, rate=rate, method="POST", body=body)
                finally:
                    stop_process(gateway)
                out["runs"][name] = {"load": load, "fixed_rate": fixed}
        finally:
            stop_process(upstream)
            sink.shutdown()
    return out


def summarise(res: dict[str, Any]) -> list[str]:
    """Markdown table with ratios against telemetry off."""
    base = res["runs"]["off"]
    lines = [
        f"Measured {res['date']} on {res['nproc']} cores (`python -m bench.telemetry`).",
        "",
        "| telemetry | req/s | vs off | p50 / p99 ms at 500 req/s | p99 added vs off |",
        "|---|---|---|---|---|",
    ]
    for name, run in res["runs"].items():
        rps = run["load"]["rps"]
        f = run["fixed_rate"]
        lines.append(
            f"| {name} | {rps:.0f} | {rps / base['load']['rps']:.0%} |"
            f" {f['p50_ms']:.2f} / {f['p99_ms']:.2f} |"
            f" {f['p99_ms'] - base['fixed_rate']['p99_ms']:+.2f} ms |"
        )
    return lines


def main() -> None:
    """Run, print, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rate", type=int, default=500)
    args = parser.parse_args()
    res = measure(args.duration, args.rate)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    print("\n".join(summarise(res)))


if __name__ == "__main__":
    main()
