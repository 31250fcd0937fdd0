"""Instructions a request of the gateway, pass-through against the full chain: a figure this
VM's noise does not move.

    python -m bench.instructions [--requests 600] [--stages] [--multiprocess]

On the project's 2-core VM a gateway's CPU time a request under load drifts by ±20% from run
to run (``python -m bench.speed``'s CPU column), more than most single changes are worth.
valgrind's callgrind counts the instructions a process runs instead: runs of the same code
mostly agree within ~1% (up to 2%: the sampled spans and how many requests each usage write
carries vary). This starts nginx (the mock upstream, the bench's chat
answer), ``redis-server`` and an OTLP sink as ``bench.speed`` does, then each gateway under
``valgrind --tool=callgrind`` with counting off; after 300 warm-up requests it counts the
user-space instructions of ``--requests`` lone requests (one keep-alive connection, one
request at a time, 2 ms apart: the shape of a request at a fixed low rate, so Redis calls
are not shared by several requests as under saturation). Kernel time (syscalls) and the
span-export child are not counted. ``--stages`` adds the full chain without each of its
parts (limits and budgets, guardrails, span export), so what each part costs can be read
off. ``--multiprocess`` runs each gateway with ``PROMETHEUS_MULTIPROC_DIR`` set, as
``--workers`` does (one process still: the metrics' shared-file writes are what it shows).
Prints the table; results in ``bench/results/instructions.json``. Needs valgrind
(``apt-get install valgrind``) and what ``bench.speed`` needs. Each gateway takes ~30 s.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench._util import free_port, json_body, start_nginx, stop_process, wait_port
from bench.proxy import ROOT, gateway_policy
from bench.speed import ANSWER, PATH, SECRET, full_chain_policy, make_token, start_redis
from bench.telemetry import _Sink

RESULTS = ROOT / "bench" / "results" / "instructions.json"
WARMUP = 300
GAP_S = 0.002

#: The full chain less one part: (name, regex, replacement) on the full chain's policy.
WITHOUT: list[tuple[str, str, str]] = [
    ("without limits and budgets", r"rate_limits:\n(  .*\n)+?guardrails:", "guardrails:"),
    ("without guardrails", r"guardrails:\n(  .*\n|           .*\n)+?cost:", "cost:"),
    ("without span export", r'otlp_endpoint: "[^"]*", ', ""),
]


def callgrind_total(out: Path) -> int:
    """Instructions counted in the dump(s) callgrind wrote for ``out`` (``out``, ``out.1``,
    ...: a dump on request and one at exit), from their ``totals:``/``summary:`` lines."""
    total = 0
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total


def count(workdir: Path, policy: str, port: int, requests: int, auth: bool) -> int:
    """Instructions the gateway of ``policy`` runs for ``requests`` lone requests."""
    path = workdir / "policy.yaml"
    path.write_text(policy)
    out = workdir / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    with (workdir / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, sys.executable, "-m", "gateway", "run", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        wait_port(port, timeout=600)
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {make_token(path)}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json_body(1024)

        def send(n: int) -> None:
            for _ in range(n):
                conn.request("POST", PATH, body, headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise SystemExit(f"gateway answered {resp.status}: see {workdir}")
                time.sleep(GAP_S)

        send(WARMUP)
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proc.pid)], check=True, capture_output=True)
        send(requests)
        subprocess.run([*control, "-i", "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
        conn.close()
    finally:
        stop_process(proc, grace_s=60)
    total = callgrind_total(out)
    if not total:
        raise SystemExit(f"no callgrind totals in {workdir}")
    return total


def measure(requests: int, stages: bool, multiprocess: bool = False) -> dict[str, Any]:
    """Run every variant; returns the results document."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "requests": requests,
        "multiprocess": multiprocess,
        "instructions_per_request": {},
    }
    sink_port = free_port()
    sink = ThreadingHTTPServer(("127.0.0.1", sink_port), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    procs: list[subprocess.Popen[bytes]] = []
    os.environ["BENCH_JWT_SECRET"] = SECRET
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        work = Path(tmp)
        up, redis_port = free_port(), free_port()
        try:
            procs.append(start_nginx(up, "static", None, work / "up", answer=ANSWER))
            procs.append(start_redis(redis_port, work))
            wait_port(up)
            wait_port(redis_port)
            if multiprocess:
                (work / "metrics").mkdir()
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(work / "metrics")
            full = full_chain_policy(redis_port, sink_port)
            variants: list[tuple[str, str | None]] = [("pass-through", None), ("full chain", full)]
            if stages:
                for name, pattern, repl in WITHOUT:
                    text, n = re.subn(pattern, repl, full)
                    assert n == 1, name
                    variants.append((name, text))
            for i, (name, chain) in enumerate(variants):
                (work / str(i)).mkdir()
                port = free_port()
                policy = gateway_policy(port, free_port(), up, chain or "", chain is not None)
                total = count(work / str(i), policy, port, requests, chain is not None)
                per = round(total / requests)
                out["instructions_per_request"][name] = per
                print(f"{name}: {per / 1000:.0f}k instructions a request", flush=True)
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            sink.shutdown()
            if multiprocess:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    per = out["instructions_per_request"]
    out["pass_through_over_full_chain"] = round(per["pass-through"] / per["full chain"], 3)
    return out


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--stages", action="store_true", help="also the full chain less each part")
    ap.add_argument(
        "--multiprocess", action="store_true", help="metrics in multiprocess mode, as --workers"
    )
    args = ap.parse_args()
    res = measure(args.requests, args.stages, args.multiprocess)
    per = res["instructions_per_request"]
    full = per["full chain"]
    mode = ", metrics in multiprocess mode" if res["multiprocess"] else ""
    print(f"\n{res['requests']} lone requests each{mode}, {res['date']}, {res['machine']}\n")
    print("| gateway | instructions a request | vs full chain |")
    print("|---|---|---|")
    for name, n in per.items():
        print(f"| {name} | {n / 1000:.0f}k | {100 * n / full:.0f}% |")
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
