"""A request's bookkeeping runs after its answer has been written, and still counts the
request's own duration."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.app import GatewayApp
from gateway.asgi import Message
from gateway.context import RequestContext
from gateway.corked import CorkedTransport
from gateway.pipeline import BuildContext, Phase, Pipeline
from gateway.policy import load_policy_text
from gateway.routes import CompiledRoute
from tests.procs import MockLLM


class Wire:
    """The socket under the corked transport: what has really been written."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


@dataclass
class Finisher:
    wire: Wire
    name: str = "finisher"
    phase: Phase = Phase.OUTPUT_GUARD
    seen: list[tuple[bytes, float]] = field(default_factory=list)

    def on_finish(self, ctx: RequestContext) -> None:
        self.seen.append((self.wire.written, ctx.ended))


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/models",
        "raw_path": b"/v1/models",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gw")],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8080),
    }


async def _run(mock: MockLLM) -> None:
    policy = load_policy_text(
        f"version: 1\nupstream: {{url: '{mock.url}'}}\nroutes:\n  - {{name: all, path: /}}\n"
    )
    wire = Wire()
    finisher = Finisher(wire)

    def factory(route: CompiledRoute, build: BuildContext) -> list[object]:
        return [finisher]

    pipeline = Pipeline(policy, (factory,))
    app = GatewayApp(pipeline)
    corked = CorkedTransport(wire, asyncio.get_running_loop())  # type: ignore[arg-type]

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        # as uvicorn: the head and the body go to the transport as they are sent
        if message["type"] == "http.response.start":
            corked.write(b"HTTP/1.1 %d OK\r\n\r\n" % message["status"])
        else:
            corked.write(message.get("body", b""))

    await app(_scope(), receive, send)
    returned = time.perf_counter()
    # the handler has returned: the request is answered but not yet recorded
    assert finisher.seen == []
    assert app.inflight == 1 and pipeline.inflight == 1  # a retired pipeline waits for it
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(finisher.seen) == 1
    written, ended = finisher.seen[0]
    assert written.startswith(b"HTTP/1.1 200 OK") and written.endswith(b"}")
    assert 0 < ended <= returned  # the duration ends when the handler did
    assert app.inflight == 0 and pipeline.inflight == 0
    await pipeline.close()


def test_the_answer_is_written_before_the_request_is_recorded(mock_llm: MockLLM) -> None:
    asyncio.run(_run(mock_llm))
