"""Shared helpers for the loopback benchmarks in ``bench/``.

Everything here talks to 127.0.0.1 only and every load run is bounded in time.

API: free_port, wait_port, start_nginx, stop_process, run_wrk, parse_wrk,
openloop_binary, load_get_post, median_by_rps, json_body, rss_mb.

Fixed rate: ``wrk2`` is not in Debian, so ``run_wrk(..., rate=N)`` runs
``bench/openloop.c``, a small open-loop HTTP/1.1 generator in C (epoll and a timerfd, one
thread), compiled once per source version by :func:`openloop_binary` into
``~/.cache/gateway-bench``: request *i* is due at ``t0 + i / rate`` and its latency counts
from then, so queueing behind a slow server shows (no coordinated omission);
``connections`` caps concurrency. Results say ``"generator": "c-openloop"``, and
``late_sends`` counts requests that went out over 1 ms after their due time (the generator
or the machine fell behind). Without a C compiler it falls back to this module's Python
generator (asyncio + aiohttp on uvloop, ``python -m bench._util openloop``, ``"generator":
"python-openloop"``), which costs ~0.5-1 ms of p50 by itself on 2 cores, ~6x the C one's
CPU, and tops out at a few thousand req/s: check ``achieved_rps``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (racy but fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until 127.0.0.1:``port`` accepts a connection (TimeoutError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGTERM ``proc``; SIGKILL it if it has not exited after ``grace_s`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


def start_nginx(
    port: int,
    mode: Literal["static", "proxy"],
    upstream_port: int | None,
    workdir: Path,
    answer: str = '{"ok":true}',
) -> subprocess.Popen[bytes]:
    """Write ``workdir/nginx.conf`` and start nginx in the foreground (1 worker).

    ``static`` answers ``200`` with ``answer`` (JSON, no single quotes) on every path and
    method (a POST body is read and discarded). ``proxy`` forwards to
    ``127.0.0.1:upstream_port`` over HTTP/1.1 keep-alive (``upstream`` block with
    ``keepalive 64``). The caller stops the returned process (see :func:`stop_process`)
    and should :func:`wait_port` first.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if mode == "static":
        upstream_block = ""
        location = f"default_type application/json;\n            return 200 '{answer}';"
    elif mode == "proxy":
        if upstream_port is None:
            raise ValueError("proxy mode needs upstream_port")
        upstream_block = (
            "upstream up {\n"
            f"        server 127.0.0.1:{upstream_port};\n"
            "        keepalive 64;\n        keepalive_requests 1000000;\n    }"
        )
        location = (
            "proxy_pass http://up;\n            proxy_http_version 1.1;\n"
            '            proxy_set_header Connection "";'
        )
    else:
        raise ValueError(f"unknown nginx mode {mode!r}")
    temp_dirs = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = f"""{user}daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
{temp_dirs}
    {upstream_block}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            {location}
        }}
    }}
}}
"""
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    cmd = [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf_path)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _to_ms(text: str) -> float:
    """Convert a wrk duration such as ``812.00us`` or ``1.20ms`` to milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Parse ``wrk --latency`` output into rps, p50/p75/p90/p99 (ms) and error counts."""
    result: dict[str, Any] = {"generator": "wrk", "errors": 0, "non_2xx": 0}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise ValueError(f"no Requests/sec in wrk output:\n{output}")
    result["rps"] = float(rps.group(1))
    total = re.search(r"(\d+) requests in", output)
    result["requests"] = int(total.group(1)) if total else None
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.MULTILINE):
        result[f"p{pct}_ms"] = _to_ms(value)
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        result["errors"] = sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        result["non_2xx"] = int(non2xx.group(1))
    return result


@functools.cache
def openloop_binary() -> str | None:
    """Path of ``bench/openloop.c`` compiled with ``-O2``, or None without a C compiler.

    Built once per version of the source into ``~/.cache/gateway-bench/openloop-<sha256,
    12 hex>`` (``$XDG_CACHE_HOME`` if set) with ``$CC``, else ``cc`` or ``gcc``; compiled to
    a temporary name and renamed into place, so concurrent callers are safe. When there is no
    compiler or the build fails, one warning goes to stderr and None is returned (then
    :func:`run_wrk` uses the Python generator).
    """
    source = Path(__file__).resolve().parent / "openloop.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gateway-bench"
    binary = cache / f"openloop-{digest}"
    if os.access(binary, os.X_OK):
        return str(binary)
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0] or not shutil.which(cc[0]):
        print("bench: no C compiler; using the Python open-loop generator", file=sys.stderr)
        return None
    tmp = binary.with_name(f"{binary.name}.tmp{os.getpid()}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [*cc, "-O2", "-o", str(tmp), str(source)], capture_output=True, text=True, check=True
        )
        os.replace(tmp, binary)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = str(getattr(exc, "stderr", None) or exc).strip()[-500:]
        warning = f"bench: cannot build {source.name} ({detail}); using the Python generator"
        print(warning, file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return None
    return str(binary)


def _raw_request(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    """One complete keep-alive HTTP/1.1 request for ``url``, as bench/openloop.c sends it."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fields = {"host": ("Host", f"{parts.hostname}:{parts.port or 80}")}
    if body:
        fields["content-type"] = ("Content-Type", "application/json")
    fields.update({name.lower(): (name, value) for name, value in headers.items()})
    fields["content-length"] = ("Content-Length", str(len(body or b"")))
    fields["connection"] = ("Connection", "keep-alive")
    head = f"{method} {target} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.values())
    return (head + "\r\n").encode("latin-1") + (body or b"")


def _run_openloop(
    url: str,
    rate: int,
    duration_s: int,
    connections: int,
    method: str,
    body: bytes | None,
    headers: dict[str, str],
    tmp: Path,
) -> dict[str, Any]:
    """A fixed-rate run: the C generator, or the Python one when it cannot be built."""
    binary = openloop_binary()
    parts = urlsplit(url)
    if binary is not None and parts.scheme == "http":
        request = tmp / "request.http"
        request.write_bytes(_raw_request(url, method, body, headers))
        host = socket.gethostbyname(parts.hostname or "127.0.0.1")
        cmd = [binary, host, str(parts.port or 80), str(request), str(rate), str(duration_s)]
        cmd.append(str(connections))
    else:
        body_path = tmp / "body.bin"
        body_path.write_bytes(body or b"")
        cmd = [sys.executable, "-m", "bench._util", "openloop", url, "--rate", str(rate)]
        cmd += ["--duration", str(duration_s), "--connections", str(connections)]
        cmd += ["--method", method, "--body-file", str(body_path)]
        for name, value in headers.items():
            cmd += ["--header", f"{name}: {value}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True)
    return dict(json.loads(proc.stdout))


def run_wrk(
    url: str,
    connections: int = 32,
    threads: int = 2,
    duration_s: int = 10,
    method: str = "GET",
    body: bytes | None = None,
    rate: int | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Load ``url`` for ``duration_s`` seconds and return rps and latency percentiles (ms).

    Without ``rate`` this is closed-loop ``wrk --latency`` (``threads`` threads,
    ``connections`` connections); a ``body`` is sent with ``Content-Type:
    application/json`` through a generated Lua script. With ``rate`` (requests/s) it is
    the open-loop generator described in the module docstring (``bench/openloop.c``, or the
    Python one without a C compiler), over at most ``connections`` connections.
    ``headers`` are added to every request. Keys: ``rps``, ``p50_ms``, ``p99_ms`` (also
    ``p75_ms``/``p90_ms`` for wrk and the C generator), ``errors``, ``non_2xx``,
    ``generator``; fixed-rate runs add ``achieved_rps`` and ``requests`` (and, from the C
    generator, ``p999_ms``, ``max_ms`` and ``late_sends``).
    """
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        if rate is not None:
            return _run_openloop(
                url, rate, duration_s, connections, method, body, headers or {}, Path(tmp)
            )
        body_path = Path(tmp) / "body.bin"
        body_path.write_bytes(body or b"")
        cmd = ["wrk", f"-c{connections}", f"-t{threads}", f"-d{duration_s}s", "--latency"]
        if method != "GET" or body is not None or headers:
            script = Path(tmp) / "req.lua"
            lua = f'wrk.method = "{method}"\n'
            if body is not None:
                lua += (
                    f'local f = assert(io.open("{body_path}", "rb"))\n'
                    "wrk.body = f:read('*a')\nf:close()\n"
                    'wrk.headers["Content-Type"] = "application/json"\n'
                )
            for name, value in (headers or {}).items():
                lua += f'wrk.headers["{name}"] = "{value}"\n'
            script.write_text(lua)
            cmd += ["-s", str(script)]
        proc = subprocess.run(
            [*cmd, url], capture_output=True, text=True, timeout=duration_s + 30, check=True
        )
        return parse_wrk(proc.stdout)


def load_get_post(
    url: str, duration_s: int, body: bytes, warmup_s: int = 1, **wrk: Any
) -> dict[str, dict[str, Any]]:
    """``{"GET": ..., "POST": ...}``: :func:`run_wrk` results after a ``warmup_s`` run each.

    Extra keyword arguments (``connections``, ``threads``, ``rate``) go to :func:`run_wrk`.
    """
    out: dict[str, dict[str, Any]] = {}
    for method, data in (("GET", None), ("POST", body)):
        if warmup_s > 0:
            run_wrk(url, duration_s=warmup_s, method=method, body=data, **wrk)
        out[method] = run_wrk(url, duration_s=duration_s, method=method, body=data, **wrk)
    return out


def median_by_rps(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The sample with the median ``rps`` (the higher one of an even count)."""
    return sorted(samples, key=lambda sample: float(sample["rps"]))[len(samples) // 2]


def json_body(size: int = 1024) -> bytes:
    """A chat-completion-like JSON document of exactly ``size`` bytes (at least 64)."""
    head, tail = b'{"model":"m","messages":[{"role":"user","content":"', b'"}]}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def write_readme_section(start: str, end: str, lines: list[str]) -> None:
    """Replace the text between the ``start`` and ``end`` markers of README.md with ``lines``."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")


def metric_samples(admin_port: int, sample: str) -> list[tuple[dict[str, str], float]]:
    """The ``sample`` series (e.g. ``gateway_state_errors_total``, or a histogram's
    ``..._bucket``) on a gateway's ``/metrics``, as (labels, value), read with
    prometheus-client's own text parser."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    ]


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of ``pid`` in MiB, read from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise ValueError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time ``pids`` have used so far, in seconds (/proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_ms: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_ms:
        return None
    rank = max(0, min(len(sorted_ms) - 1, round(pct / 100.0 * len(sorted_ms)) - 1))
    return sorted_ms[rank]


async def _openloop(
    url: str,
    rate: int,
    duration_s: float,
    connections: int,
    method: str,
    body: bytes | None,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fixed-rate open-loop load; latency counts from each request's scheduled start."""
    import aiohttp

    latencies: list[float] = []
    counts = {"errors": 0, "non_2xx": 0}
    headers = {"Content-Type": "application/json"} if body else {}
    headers.update(extra_headers or {})
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(scheduled: float) -> None:
            try:
                async with session.request(method, url, data=body, headers=headers) as resp:
                    await resp.read()
                    if not 200 <= resp.status < 400:
                        counts["non_2xx"] += 1
                latencies.append((time.perf_counter() - scheduled) * 1000.0)
            except (aiohttp.ClientError, TimeoutError):
                counts["errors"] += 1

        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        total = int(rate * duration_s)
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=30)
            for task in pending:
                task.cancel()
            counts["errors"] += len(pending)
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "generator": "python-openloop",
        "target_rps": rate,
        "rps": len(latencies) / elapsed,
        "achieved_rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        **counts,
    }


def _main() -> None:
    """CLI entry used by :func:`run_wrk` for fixed-rate runs (prints JSON)."""
    parser = argparse.ArgumentParser(prog="python -m bench._util")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ol = sub.add_parser("openloop", help="fixed-rate open-loop load, JSON on stdout")
    ol.add_argument("url")
    ol.add_argument("--rate", type=int, required=True)
    ol.add_argument("--duration", type=float, default=10.0)
    ol.add_argument("--connections", type=int, default=32)
    ol.add_argument("--method", default="GET")
    ol.add_argument("--body-file", type=Path)
    ol.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = parser.parse_args()
    body = args.body_file.read_bytes() if args.body_file else b""
    extra = dict(h.split(": ", 1) for h in args.header)
    coro = _openloop(
        args.url, args.rate, args.duration, args.connections, args.method, body or None, extra
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a gateway dependency
        res = asyncio.run(coro)
    else:
        res = uvloop.run(coro)
    print(json.dumps(res))


if __name__ == "__main__":
    _main()
