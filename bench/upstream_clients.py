"""Choose the gateway's upstream HTTP client by measurement.

Run ``python -m bench.upstream_clients [--duration 10] [--only NAME ...]``. nginx (static)
is the upstream; each candidate is a pure-ASGI streaming reverse proxy under uvicorn
(uvloop, httptools, 1 worker) in a subprocess, loaded by ``wrk -c32 -t2`` with GET and a
1 KiB JSON POST; "direct" is wrk against nginx. Results: stdout and
``bench/results/upstream_clients.json``. Plain candidates stream the request body from
ASGI ``receive`` through an async generator; ``*-peek`` ones pass bytes when the first
body message is the whole body (the usual LLM API call), else fall back to the generator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from bench import _util as bu

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization proxy-connection "
    b"te trailer trailers transfer-encoding upgrade host".split()
)
SKIP_AUTO = ("Accept", "Accept-Encoding", "User-Agent")  # aiohttp must not add its own
PATH = "/v1/chat/completions?x=1"
RESULTS = Path(__file__).resolve().parent / "results" / "upstream_clients.json"
HTTPX_CANDIDATES: tuple[str, ...] = ("httpx-default", "httpx-pool64", "httpx-pool64-peek")
HTTPX_CANDIDATES += ("httpx-aiohttp", "httpx2-pool64")  # httpx2: pydantic's fork, used by openai
CANDIDATES = (*HTTPX_CANDIDATES, "aiohttp", "aiohttp-peek", "gateway-http1-peek")
"""``gateway-http1-peek`` is the gateway's own client (``gateway.upstream``, the one in use)."""


class ClientGone(Exception):
    """The downstream client disconnected before its request body was complete."""


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers (and Host: the client sets it from the upstream URL)."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


async def request_body(scope: Scope, receive: Receive, peek: bool) -> Any:
    """Return the request body: None, whole bytes (``peek`` fast path) or a byte stream."""
    names = {k for k, _ in scope["headers"]}
    if b"content-length" not in names and b"transfer-encoding" not in names:
        return None
    first = b""
    if peek:
        msg = await receive()
        first = msg.get("body", b"")
        if not msg.get("more_body", False):
            return first

    async def chunks() -> AsyncIterator[bytes]:
        if first:
            yield first
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone("client went away while sending the body")
            more = msg.get("more_body", False)
            if msg.get("body"):
                yield msg["body"]

    return chunks()


async def stream_back(send: Send, status: int, headers: Headers, it: AsyncIterator[bytes]) -> None:
    """Send the response start, then the chunks; the last one carries more_body=False."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    prev = b""
    async for chunk in it:
        if chunk:
            if prev:
                await send({"type": "http.response.body", "body": prev, "more_body": True})
            prev = chunk
    await send({"type": "http.response.body", "body": prev, "more_body": False})


class ProxyApp:
    """Pure-ASGI streaming reverse proxy to ``upstream``; subclasses own the client."""

    def __init__(self, name: str, upstream: str) -> None:
        """``name`` is the candidate, ``upstream`` is ``http://127.0.0.1:PORT``."""
        self.name, self.upstream, self.peek = name, upstream, name.endswith("-peek")

    def target(self, scope: Scope) -> str:
        """Upstream URL for this request (raw path and query string kept as sent)."""
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{self.upstream}{path}?{query}" if query else f"{self.upstream}{path}"

    async def open(self) -> None:
        """Create the client inside the server's event loop (lifespan startup)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the client (lifespan shutdown)."""
        raise NotImplementedError

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Proxy one HTTP request; False when the upstream could not be reached."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point: HTTP (502 when the upstream is down) and lifespan."""
        if scope["type"] == "http":
            try:
                if not await self.forward(scope, receive, send):
                    await send({"type": "http.response.start", "status": 502, "headers": []})
                    await send({"type": "http.response.body", "body": b"bad gateway"})
            except ClientGone:
                return
        elif scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await self.open()
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await self.close()
            await send({"type": "lifespan.shutdown.complete"})


class HttpxProxy(ProxyApp):
    """httpx.AsyncClient over httpcore (default or 64-connection pool) or aiohttp; or httpx2."""

    async def open(self) -> None:
        """Build the client; requests go through ``send`` so no default headers are added."""
        self.httpx = importlib.import_module("httpx2" if "httpx2" in self.name else "httpx")
        kwargs: dict[str, Any] = {}
        if "pool64" in self.name:
            kwargs["limits"] = self.httpx.Limits(max_keepalive_connections=64, max_connections=64)
        if self.name.startswith("httpx-aiohttp"):
            from httpx_aiohttp import AiohttpTransport

            session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=SKIP_AUTO)
            kwargs["transport"] = AiohttpTransport(client=session)
        self.client = self.httpx.AsyncClient(**kwargs)

    async def close(self) -> None:
        """Close the pool."""
        await self.client.aclose()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Proxy one request with ``client.send(..., stream=True)`` and ``aiter_raw``."""
        body = await request_body(scope, receive, self.peek)
        headers = strip_hop_by_hop(scope["headers"])
        url = self.target(scope)
        request = self.httpx.Request(scope["method"], url, headers=headers, content=body)
        try:
            resp = await self.client.send(request, stream=True)
        except self.httpx.HTTPError:
            return False
        try:
            out = strip_hop_by_hop(resp.headers.raw)
            await stream_back(send, resp.status_code, out, resp.aiter_raw())
        finally:
            await resp.aclose()
        return True


class AiohttpProxy(ProxyApp):
    """aiohttp.ClientSession, TCPConnector(limit=256), auto_decompress off."""

    async def open(self) -> None:
        """Build the session (no automatic Accept/Accept-Encoding/User-Agent headers)."""
        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=300, enable_cleanup_closed=False)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        )

    async def close(self) -> None:
        """Close the session and its connector."""
        await self.session.close()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Proxy one request, streaming the response with ``content.iter_any()``."""
        body = await request_body(scope, receive, self.peek)
        fwd = strip_hop_by_hop(scope["headers"])
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fwd]
        url = URL(self.target(scope), encoded=True)
        try:
            resp = await self.session.request(
                scope["method"], url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError):
            return False
        try:
            out = strip_hop_by_hop(resp.raw_headers)
            await stream_back(send, resp.status, out, resp.content.iter_any())
        finally:
            resp.release()
        return True


class GatewayClientProxy(ProxyApp):
    """``gateway.upstream.Upstream``: asyncio protocols, httptools' parser, a LIFO pool."""

    async def open(self) -> None:
        """Build the client (its pool opens on the first request, in this loop)."""
        from gateway.policy.sections import UpstreamConfig
        from gateway.upstream import Upstream

        self.client = Upstream(UpstreamConfig(url=self.upstream))

    async def close(self) -> None:
        """Close the pool."""
        await self.client.close()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Proxy one request, streaming the response with ``chunks()``."""
        from gateway.errors import UpstreamError

        body = await request_body(scope, receive, self.peek)
        names = (b"content-length",) if isinstance(body, bytes) else ()
        fwd = [(k, v) for k, v in strip_hop_by_hop(scope["headers"]) if k not in names]
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            resp = await self.client.request(
                scope["method"], f"{path}?{query}" if query else path, fwd, body
            )
        except UpstreamError:
            return False
        try:
            out = strip_hop_by_hop(resp.headers)
            await stream_back(send, resp.status, out, resp.chunks())
        finally:
            resp.close()
        return True


def make_app(name: str, upstream: str) -> ProxyApp:
    """Build candidate ``name`` (one of :data:`CANDIDATES`) proxying to ``upstream``."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown candidate {name!r}")
    cls: type[ProxyApp] = HttpxProxy
    if name.startswith("aiohttp"):
        cls = AiohttpProxy
    elif name.startswith("gateway"):
        cls = GatewayClientProxy
    return cls(name, upstream)


def serve(name: str, port: int, upstream_port: int) -> None:
    """Run candidate ``name`` under uvicorn on 127.0.0.1:``port`` (blocks)."""
    import uvicorn

    app = make_app(name, f"http://127.0.0.1:{upstream_port}")
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", workers=1,
                log_level="warning", access_log=False, proxy_headers=False, lifespan="on",
                server_header=False, date_header=False)  # fmt: skip


def check_proxy(port: int, body: bytes) -> None:
    """One GET and one POST through the proxy must return nginx's 200 ``{"ok":true}``."""
    for data in (None, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/probe?q=1", data=data)
        with urllib.request.urlopen(req, timeout=5) as resp:
            got = resp.read()
            if resp.status != 200 or got != b'{"ok":true}':
                raise RuntimeError(f"proxy answered {resp.status} {got!r}")


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table; the x columns are req/s relative to direct nginx."""
    base = rows[0]
    head = f"{'candidate':<18} {'GET r/s':>8} {'GET p50/p99 ms':>15} {'POST r/s':>8} "
    head += f"{'POST p50/p99 ms':>16} {'GET x':>6} {'POST x':>6} {'RSS MB':>6}"
    lines = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<18} skipped: {row['error']}")
            continue
        g, p = row["GET"], row["POST"]
        lines.append(
            f"{row['name']:<18} {g['rps']:>8.0f} {g['p50_ms']:>7.2f}/{g['p99_ms']:<7.2f} "
            f"{p['rps']:>8.0f} {p['p50_ms']:>8.2f}/{p['p99_ms']:<7.2f} "
            f"{g['rps'] / base['GET']['rps']:>6.3f} {p['rps'] / base['POST']['rps']:>6.3f} "
            f"{row.get('rss_mb', 0.0):>6.1f}"
        )
    return "\n".join(lines)


def measure_candidate(name: str, up_port: int, duration: int, body: bytes) -> dict[str, Any]:
    """Serve candidate ``name`` in a subprocess, check it, load it, stop it."""
    print(f"... {name}", file=sys.stderr, flush=True)
    port = bu.free_port()
    cmd = [sys.executable, "-m", "bench.upstream_clients", "--serve", name]
    cmd += ["--port", str(port), "--upstream-port", str(up_port)]
    proxy = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    try:
        bu.wait_port(port, 15)
        check_proxy(port, body)
        loads = bu.load_get_post(f"http://127.0.0.1:{port}{PATH}", duration, body)
        return {**loads, "rss_mb": bu.rss_mb(proxy.pid)}
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        bu.stop_process(proxy)


def run(duration: int, names: Iterable[str], rounds: int) -> list[dict[str, Any]]:
    """Measure nginx directly and through each candidate, ``rounds`` interleaved sweeps.

    Each row keeps every sample; its GET/POST figures are the median-rps sample
    (the higher one of two), since this 2-core VM drifts by +-20 % between runs.
    """
    body = bu.json_body()
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in ("direct", *names)}
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        up_port = bu.free_port()
        nginx = bu.start_nginx(up_port, "static", None, Path(tmp))
        try:
            bu.wait_port(up_port, 10)
            for _ in range(rounds):
                url = f"http://127.0.0.1:{up_port}{PATH}"
                samples["direct"].append(bu.load_get_post(url, duration, body))
                for name in names:
                    samples[name].append(measure_candidate(name, up_port, duration, body))
        finally:
            bu.stop_process(nginx)
    rows: list[dict[str, Any]] = []
    for name, runs in samples.items():
        errors = [r["error"] for r in runs if "error" in r]
        row: dict[str, Any] = {"name": name, "samples": runs}
        if errors:
            row["error"] = errors[0]
        else:
            row["GET"] = bu.median_by_rps([r["GET"] for r in runs])
            row["POST"] = bu.median_by_rps([r["POST"] for r in runs])
            row["rss_mb"] = max(r.get("rss_mb", 0.0) for r in runs)
        rows.append(row)
    return rows


def main() -> None:
    """CLI: run the benchmark, or serve one candidate (``--serve``, used internally)."""
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_clients")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--only", nargs="*", default=[], choices=CANDIDATES)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved sweeps (median)")
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream_port)
        return
    rows = run(args.duration, args.only or CANDIDATES, args.rounds)
    print(table(rows))
    pkgs = {"httpx", "httpcore", "httpx2", "httpcore2", "httpx-aiohttp", "aiohttp", "uvicorn"}
    pkgs |= {"uvloop", "httptools"}
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "wrk": {"connections": 32, "threads": 2, "post_body_bytes": len(bu.json_body())},
        "versions": {d.name: d.version for d in md.distributions() if d.name in pkgs},
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
