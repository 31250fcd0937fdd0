"""Choose the gateway's upstream HTTP client by measurement.

Run: ``python -m bench.upstream_clients [--duration 10] [--only NAME ...]``.

nginx (static mode, 1 worker) is the upstream. Each candidate is a tiny pure-ASGI
streaming reverse proxy (method, path, query, headers minus hop-by-hop, body; the
response is streamed back chunk by chunk) served by uvicorn (uvloop, httptools,
1 worker) in a subprocess, and loaded with ``wrk -c32 -t2`` for GET and for a POST
of a 1 KiB JSON body. "direct" is wrk straight against nginx. The table goes to
stdout and the figures to ``bench/results/upstream_clients.json``.

Request bodies: a request has a body iff it carries Content-Length or
Transfer-Encoding. Plain candidates stream every body from ASGI ``receive`` through an
async generator; ``*-peek`` candidates await the first body message and, when it is
the whole body (``more_body`` false, the usual case for LLM API calls), pass bytes,
falling back to the generator otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
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

from bench._util import free_port, rss_mb, run_wrk, start_nginx, stop_process, wait_port

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterator[bytes] | None

HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization proxy-connection "
    b"te trailer trailers transfer-encoding upgrade host".split()
)
RESULTS = Path(__file__).resolve().parent / "results" / "upstream_clients.json"
CANDIDATES = (
    "httpx-default",
    "httpx-pool64",
    "httpx-pool64-peek",
    "httpx-aiohttp",
    "aiohttp",
    "aiohttp-peek",
)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers (and Host: the client sets it from the upstream URL)."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


async def request_body(scope: Scope, receive: Receive, peek: bool) -> Body:
    """Return the request body: None, whole bytes (``peek`` fast path) or a byte stream."""
    names = {k for k, _ in scope["headers"]}
    if b"content-length" not in names and b"transfer-encoding" not in names:
        return None
    first: bytes | None = None
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
                raise ConnectionError("client went away while sending the body")
            more = msg.get("more_body", False)
            if msg.get("body"):
                yield msg["body"]

    return chunks()


async def stream_back(
    send: Send, status: int, headers: Headers, body: AsyncIterator[bytes]
) -> None:
    """Send the response start, then the body chunks; the last chunk carries more_body=False."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    prev = b""
    async for chunk in body:
        if not chunk:
            continue
        if prev:
            await send({"type": "http.response.body", "body": prev, "more_body": True})
        prev = chunk
    await send({"type": "http.response.body", "body": prev, "more_body": False})


async def bad_gateway(send: Send) -> None:
    """Answer 502 when the upstream could not be reached (before any response byte)."""
    await send({"type": "http.response.start", "status": 502, "headers": []})
    await send({"type": "http.response.body", "body": b"bad gateway"})


class ProxyApp:
    """Pure-ASGI streaming reverse proxy; subclasses own the upstream client."""

    def __init__(self, upstream: str, peek: bool) -> None:
        """``upstream`` is ``http://127.0.0.1:PORT``; ``peek`` enables the body fast path."""
        self.upstream = upstream
        self.peek = peek

    def target(self, scope: Scope) -> str:
        """Upstream URL for this request (raw path and query string kept as sent)."""
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{self.upstream}{path}?{query}" if query else f"{self.upstream}{path}"

    async def open(self) -> None:
        """Create the client (inside the server's event loop)."""

    async def close(self) -> None:
        """Close the client."""

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Proxy one HTTP request."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point: HTTP requests and the lifespan protocol."""
        if scope["type"] == "http":
            await self.forward(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await self.open()
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return


class HttpxProxy(ProxyApp):
    """httpx.AsyncClient; ``transport`` selects the aiohttp transport instead of httpcore."""

    def __init__(self, upstream: str, peek: bool, pool64: bool, transport: str = "httpcore"):
        """Configure which httpx pool/transport :meth:`open` builds."""
        super().__init__(upstream, peek)
        self.pool64, self.transport = pool64, transport

    async def open(self) -> None:
        """Build the client; requests are sent with ``send`` so no default headers are added."""
        import httpx

        kwargs: dict[str, Any] = {}
        if self.pool64:
            kwargs["limits"] = httpx.Limits(max_keepalive_connections=64, max_connections=64)
        if self.transport == "aiohttp":
            import aiohttp
            from httpx_aiohttp import AiohttpTransport

            session = aiohttp.ClientSession(
                auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept")
            )
            kwargs["transport"] = AiohttpTransport(client=session)
        self.client = httpx.AsyncClient(**kwargs)

    async def close(self) -> None:
        """Close the pool."""
        await self.client.aclose()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Proxy one request with ``client.send(..., stream=True)`` and ``aiter_raw``."""
        import httpx

        body = await request_body(scope, receive, self.peek)
        headers = strip_hop_by_hop(scope["headers"])
        request = httpx.Request(scope["method"], self.target(scope), headers=headers, content=body)
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.HTTPError:
            await bad_gateway(send)
            return
        try:
            out = strip_hop_by_hop(resp.headers.raw)
            await stream_back(send, resp.status_code, out, resp.aiter_raw())
        finally:
            await resp.aclose()


class AiohttpProxy(ProxyApp):
    """aiohttp.ClientSession with a TCPConnector (limit 256), auto_decompress off."""

    async def open(self) -> None:
        """Build the session; skip aiohttp's own Accept-Encoding/User-Agent headers."""
        import aiohttp

        connector = aiohttp.TCPConnector(limit=256, ttl_dns_cache=300, enable_cleanup_closed=False)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        )

    async def close(self) -> None:
        """Close the session and its connector."""
        await self.session.close()

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Proxy one request, streaming the response with ``content.iter_any()``."""
        import aiohttp
        from yarl import URL

        body = await request_body(scope, receive, self.peek)
        fwd = strip_hop_by_hop(scope["headers"])
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fwd]
        url = URL(self.target(scope), encoded=True)
        try:
            resp = await self.session.request(
                scope["method"], url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError):
            await bad_gateway(send)
            return
        try:
            out = strip_hop_by_hop(resp.raw_headers)
            await stream_back(send, resp.status, out, resp.content.iter_any())
        finally:
            resp.release()


def make_app(name: str, upstream: str) -> ProxyApp:
    """Build candidate ``name`` (one of :data:`CANDIDATES`) proxying to ``upstream``."""
    peek = name.endswith("-peek")
    if name.startswith("httpx-aiohttp"):
        return HttpxProxy(upstream, peek, pool64=False, transport="aiohttp")
    if name.startswith("httpx-"):
        return HttpxProxy(upstream, peek, pool64=name.startswith("httpx-pool64"))
    if name.startswith("aiohttp"):
        return AiohttpProxy(upstream, peek)
    raise ValueError(f"unknown candidate {name!r}")


def serve(name: str, port: int, upstream_port: int) -> None:
    """Run candidate ``name`` under uvicorn on 127.0.0.1:``port`` (blocks)."""
    import uvicorn

    app = make_app(name, f"http://127.0.0.1:{upstream_port}")
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", workers=1,
                log_level="warning", access_log=False, proxy_headers=False, lifespan="on",
                server_header=False, date_header=False)  # fmt: skip


def json_body(size: int = 1024) -> bytes:
    """A chat-completion-like JSON document of exactly ``size`` bytes."""
    head, tail = b'{"model":"m","messages":[{"role":"user","content":"', b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def check_proxy(port: int, body: bytes) -> None:
    """One GET and one POST through the proxy must return nginx's 200 ``{"ok":true}``."""
    for data in (None, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/probe?q=1", data=data)
        with urllib.request.urlopen(req, timeout=5) as resp:
            got = resp.read()
            if resp.status != 200 or got != b'{"ok":true}':
                raise RuntimeError(f"proxy answered {resp.status} {got!r}")


def measure(port: int, duration: int, body: bytes) -> dict[str, Any]:
    """Warm up 1 s, then wrk GET and POST for ``duration`` s each."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions?x=1"
    out: dict[str, Any] = {}
    for method, data in (("GET", None), ("POST", body)):
        run_wrk(url, duration_s=1, method=method, body=data)
        out[method] = run_wrk(url, duration_s=duration, method=method, body=data)
    return out


def versions() -> dict[str, str]:
    """Installed versions of the packages under test."""
    names = ("httpx", "httpcore", "httpx-aiohttp", "aiohttp", "uvicorn", "uvloop", "httptools")
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def table(rows: list[dict[str, Any]]) -> str:
    """Format the results as a plain-text table (ratios are req/s vs direct nginx)."""
    base = rows[0]
    head = f"{'candidate':<18} {'GET r/s':>9} {'GET p50/p99 ms':>15} {'POST r/s':>9} "
    head += f"{'POST p50/p99 ms':>16} {'GET x':>6} {'POST x':>6} {'RSS MB':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['name']:<18} skipped: {row['error']}")
            continue
        g, p = row["GET"], row["POST"]
        lines.append(
            f"{row['name']:<18} {g['rps']:>9.0f} {g['p50_ms']:>7.2f}/{g['p99_ms']:<7.2f} "
            f"{p['rps']:>9.0f} {p['p50_ms']:>8.2f}/{p['p99_ms']:<7.2f} "
            f"{g['rps'] / base['GET']['rps']:>6.3f} {p['rps'] / base['POST']['rps']:>6.3f} "
            f"{row.get('rss_mb', 0.0):>7.1f}"
        )
    return "\n".join(lines)


def run(duration: int, only: list[str]) -> list[dict[str, Any]]:
    """Start nginx, measure direct and each candidate, and return one row per run."""
    body = json_body()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        up_port = free_port()
        nginx = start_nginx(up_port, "static", None, Path(tmp))
        try:
            wait_port(up_port, 10)
            rows.append({"name": "direct", **measure(up_port, duration, body)})
            for name in only or CANDIDATES:
                print(f"... {name}", file=sys.stderr, flush=True)
                port = free_port()
                cmd = [sys.executable, "-m", "bench.upstream_clients", "--serve", name]
                cmd += ["--port", str(port), "--upstream-port", str(up_port)]
                proxy = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
                try:
                    wait_port(port, 15)
                    check_proxy(port, body)
                    row = {"name": name, **measure(port, duration, body)}
                    row["rss_mb"] = rss_mb(proxy.pid)
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    row = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
                finally:
                    stop_process(proxy)
                rows.append(row)
        finally:
            stop_process(nginx)
    return rows


def main() -> None:
    """CLI: run the benchmark, or serve one candidate (``--serve``, used internally)."""
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_clients")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--only", nargs="*", default=[], choices=CANDIDATES)
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream_port)
        return
    rows = run(args.duration, args.only)
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "duration_s": args.duration,
        "wrk": {"connections": 32, "threads": 2, "post_body_bytes": len(json_body())},
        "versions": versions(),
        "results": rows,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
