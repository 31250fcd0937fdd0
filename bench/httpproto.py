"""CPU cost per request of the gateway's HTTP protocol versus uvicorn's own.

    python -m bench.httpproto [--requests 20000] [--rounds 7]

Feeds the same keep-alive requests (a GET with 8 headers, and a POST with a 1 KB body) to
``uvicorn``'s ``HttpToolsProtocol`` and to :class:`gateway.httpproto.GatewayHttpProtocol`
on a fake transport, in one uvloop loop, with an ASGI app that answers at once. CPU time
(``process_time``) is measured in alternating rounds and the medians compared, so load from
other processes on a shared machine moves both alike. This isolates what the header/body
timers, head bounds and JSON error handling add on the hot path; ``bench.proxy`` measures the
whole proxy, with much more noise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.httpproto import ConnectionLimits, protocol_class

GET = (
    b"GET /v1/models?x=1 HTTP/1.1\r\nHost: gw\r\nUser-Agent: bench\r\nAccept: */*\r\n"
    b"Authorization: Bearer abc.def.ghi\r\nX-Request-ID: r-1\r\nTraceparent: 00-"
    + b"a" * 32
    + b"-"
    + b"b" * 16
    + b"-01\r\nAccept-Encoding: gzip\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
)
POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1024\r\n\r\n" + b"x" * 1024
)


class _Transport:
    """Enough of an asyncio transport for the protocol: writes are counted, not sent."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["method"] == "POST":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok"})


async def _round(cls: type[HttpToolsProtocol], config: uvicorn.Config, n: int) -> float:
    state = ServerState()
    proto = cls(config=config, server_state=state, app_state={})
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    start = time.process_time()
    for i in range(n):
        proto.data_received(GET if i % 2 else POST)
        while state.tasks:  # noqa: ASYNC110 -- let the app answer first (keep-alive order)
            await asyncio.sleep(0)
    took = time.process_time() - start
    proto.connection_lost(None)
    assert transport.written > n * 10, "the app did not answer"
    return took / n * 1e6


def measure(requests: int, rounds: int) -> dict[str, float]:
    """Median µs of CPU per request for both protocols."""
    config = uvicorn.Config(_app, http="httptools", lifespan="off", log_config=None,
                            proxy_headers=False)  # fmt: skip
    config.load()
    ours = protocol_class(lambda: ConnectionLimits())
    loop = uvloop.new_event_loop()
    base: list[float] = []
    gateway: list[float] = []
    try:
        for _ in range(rounds):
            base.append(loop.run_until_complete(_round(HttpToolsProtocol, config, requests)))
            gateway.append(loop.run_until_complete(_round(ours, config, requests)))
    finally:
        loop.close()
    b, g = statistics.median(base), statistics.median(gateway)
    # the minimum is the least disturbed round: the best estimate on a shared machine
    bm, gm = min(base), min(gateway)
    return {
        "uvicorn_us": round(b, 2),
        "gateway_us": round(g, 2),
        "added_us": round(g - b, 2),
        "uvicorn_min_us": round(bm, 2),
        "gateway_min_us": round(gm, 2),
        "added_min_us": round(gm - bm, 2),
    }


def main() -> None:
    """Print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    res = measure(args.requests, args.rounds)
    print(f"CPU per request ({args.rounds} rounds of {args.requests}), median / min: "
          f"uvicorn HttpToolsProtocol {res['uvicorn_us']} / {res['uvicorn_min_us']} µs, "
          f"gateway protocol {res['gateway_us']} / {res['gateway_min_us']} µs, "
          f"added {res['added_us']:+} / {res['added_min_us']:+} µs")  # fmt: skip


if __name__ == "__main__":
    main()
