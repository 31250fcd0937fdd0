"""Unary gRPC calls through the gateway versus straight to the service, plaintext and mTLS.

    python -m bench.grpc [--duration 5] [--concurrency 16]

The service is the tests' Echo service (``tests/grpc/echo.proto``, one Python grpc.aio
process); the gateway proxies it with a ``grpc`` section and no auth or limits (logs at
``warning``). A load process (grpc.aio, its own process) makes ``Unary`` calls with a
100-byte message for ``--duration`` seconds after a 1 s warm-up, with 1 call in flight
(latency) and with ``--concurrency`` in flight (throughput), per target:

* ``direct`` / ``gateway`` over plaintext;
* ``direct`` / ``gateway`` with mutual TLS (client → gateway and gateway → service each with
  a client certificate from a test CA made here with ``cryptography``).

Prints a table with calls/s, p50/p99 and the gateway/direct ratios; writes
``bench/results/grpc.json``. It asserts nothing. Every process here shares the machine's
cores, so the service and the load generator limit "direct" too: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "grpc.json"


def _pct(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from tests.grpc.stubs import load

    pb2, pb2_grpc = load(Path(args.stubs))
    if args.tls:
        d = Path(args.tls)
        creds = grpc.ssl_channel_credentials(
            (d / "ca.crt").read_bytes(),
            (d / "client.key").read_bytes(),
            (d / "client.crt").read_bytes(),
        )
        channel = grpc.aio.secure_channel(args.target, creds)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    stub = pb2_grpc.EchoStub(channel)
    msg = pb2.Msg(text="x" * 100)
    await stub.Unary(msg, timeout=10)
    latencies: list[float] = []
    errors = 0
    stop_at = 0.0
    record = False

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await stub.Unary(msg, timeout=10)
            except grpc.RpcError:
                errors += 1
                continue
            if record:
                latencies.append((time.perf_counter() - t0) * 1000)

    stop_at = time.perf_counter() + 1.0  # warm-up
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    record = True
    started = time.perf_counter()
    stop_at = started + args.duration
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    await channel.close()
    latencies.sort()
    return {
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(_pct(latencies, 0.50), 3),
        "p99_ms": round(_pct(latencies, 0.99), 3),
        "calls": len(latencies),
        "errors": errors,
    }


def run_load(target: str, stubs: Path, tls: Path | None, duration: float, conc: int) -> Any:
    """One load run in its own process; its JSON result."""
    cmd = [sys.executable, "-m", "bench.grpc", "load", "--target", target, "--stubs", str(stubs)]
    cmd += ["--duration", str(duration), "--concurrency", str(conc)]
    if tls is not None:
        cmd += ["--tls", str(tls)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _service(stubs: Path, tls: Path | None, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.grpc.service", "--port", str(port), "--stubs", str(stubs)]
    if tls is not None:
        cmd += ["--cert", str(tls / "service.crt"), "--key", str(tls / "service.key")]
        cmd += ["--ca", str(tls / "ca.crt")]
    log = (workdir / f"service-{port}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
    wait_port(port)
    return proc, port


def _gateway(upstream: int, tls: Path | None, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    policy = workdir / f"policy-{port}.yaml"
    text = (
        f"version: 1\nlisten: 127.0.0.1:{free_port()}\nadmin_listen: 127.0.0.1:{free_port()}\n"
        "upstream: {url: 'http://127.0.0.1:9'}\ntelemetry: {log_level: warning}\n"
        f"grpc:\n  listen: 127.0.0.1:{port}\n  upstream: 127.0.0.1:{upstream}\n"
    )
    if tls is None:
        text += "  plaintext: true\n"
    else:
        text += (
            f"  tls: {{cert: {tls}/gateway.crt, key: {tls}/gateway.key, client_ca: {tls}/ca.crt}}\n"
            f"  upstream_tls: {{ca: {tls}/ca.crt, cert: {tls}/gateway-client.crt,"
            f" key: {tls}/gateway-client.key}}\n"
        )
    policy.write_text(text)
    log = (workdir / f"gateway-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(policy)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    wait_port(port, timeout=20)
    return proc, port


def _pki(directory: Path) -> None:
    from tests.grpc.certs import CA

    ca = CA("bench-ca")
    ca.write(directory, "ca")
    ca.issue("echo-service", server=True).write(directory, "service")
    ca.issue("gateway", server=True).write(directory, "gateway")
    ca.issue("gateway-client", server=False).write(directory, "gateway-client")
    ca.issue("bench-client", server=False).write(directory, "client")


def bench(duration: float, concurrency: int) -> dict[str, Any]:
    """Start everything, run the loads, stop everything."""
    from tests.grpc.stubs import generate

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stubs, pki = work / "stubs", work / "pki"
        generate(stubs)
        _pki(pki)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for mode, tls in (("plaintext", None), ("mtls", pki)):
                svc, svc_port = _service(stubs, tls, work)
                procs.append(svc)
                gw, gw_port = _gateway(svc_port, tls, work)
                procs.append(gw)
                for conc in (1, concurrency):
                    for target, port in (("direct", svc_port), ("gateway", gw_port)):
                        res = run_load(f"127.0.0.1:{port}", stubs, tls, duration, conc)
                        rows.append({"mode": mode, "target": target, "concurrency": conc, **res})
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            for p in procs:
                stop_process(p)
    return {
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "duration_s": duration,
        "command": f"python -m bench.grpc --duration {duration:g} --concurrency {concurrency}",
        "rows": rows,
    }


def table(res: dict[str, Any]) -> str:
    """Markdown table: one line per mode and concurrency, gateway vs direct."""
    lines = [
        "| mode | in flight | direct calls/s | gateway calls/s | ratio | direct p50 / p99 ms "
        "| gateway p50 / p99 ms | p99 added ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["concurrency"], r["target"]): r for r in res["rows"]}
    for mode, conc, _ in sorted(
        {(m, c, 0) for m, c, _ in by}, key=lambda k: (k[0] != "plaintext", k[1])
    ):
        d, g = by[(mode, conc, "direct")], by[(mode, conc, "gateway")]
        ratio = g["calls_per_s"] / d["calls_per_s"] if d["calls_per_s"] else float("nan")
        lines.append(
            f"| {mode} | {conc} | {d['calls_per_s']:.0f} | {g['calls_per_s']:.0f} | {ratio:.0%} "
            f"| {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} "
            f"| {g['p99_ms'] - d['p99_ms']:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """``bench`` (default) or ``load`` (one load process)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "load"])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--target")
    parser.add_argument("--stubs")
    parser.add_argument("--tls")
    args = parser.parse_args()
    if args.mode == "load":
        print(json.dumps(asyncio.run(_load(args))))
        return
    res = bench(args.duration, args.concurrency)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nMeasured {res['measured']} on {res['cores']} cores. Command: `{res['command']}`.\n")
    print(table(res))


if __name__ == "__main__":
    main()
