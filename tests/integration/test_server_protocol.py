"""The client-facing protocol's write timing, over TCP with uvicorn and a raw socket client.

Writes of one loop turn are coalesced (``gateway.corked``); an answer that is complete must
still leave at once, not after whatever the request's task does next in the same turn.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import uvicorn

from gateway.httpproto import ConnectionLimits, protocol_class


def test_a_complete_answer_leaves_before_the_task_goes_on() -> None:
    received = threading.Event()
    seen: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]}
        )
        await send({"type": "http.response.body", "body": b"done"})
        # The gateway's bookkeeping runs here (usage, metrics, the access record) without
        # yielding to the loop: the client must already have the answer.
        seen.append(received.wait(5))

    async def serve() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=protocol_class(ConnectionLimits),
            lifespan="off",
            log_level="warning",
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])

        def client() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                data = b""
                while not data.endswith(b"done"):
                    data += s.recv(4096)
                received.set()

        await asyncio.to_thread(client)
        await server.shutdown(sockets=[sock])

    asyncio.run(serve())
    assert seen == [True]
