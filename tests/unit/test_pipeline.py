"""Stages plug into the fixed phases without touching the proxy."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx

from gateway.app import GatewayApp
from gateway.context import RequestContext
from gateway.errors import Deny
from gateway.pipeline import BuildContext, Phase, Pipeline, ResponseHead
from gateway.policy import load_policy_text
from gateway.routes import CompiledRoute
from tests.procs import MockLLM

ORDER: list[str] = []


@dataclass
class Recorder:
    name: str
    phase: Phase
    needs_body: bool = False

    async def on_request(self, ctx: RequestContext) -> Deny | None:
        ORDER.append(self.name)
        if ctx.path.endswith("/deny") and self.phase == Phase.RATE_LIMIT:
            return Deny(429, "rate_limited", "slow down", ((b"retry-after", b"1"),))
        if self.needs_body:
            assert ctx.body is not None
            ctx.upstream_headers.append((b"x-body-len", str(len(ctx.body)).encode()))
        return None


class Upper:
    buffer = True

    async def on_chunk(self, chunk: bytes) -> bytes:
        return chunk.upper()

    async def on_end(self) -> bytes:
        return b""


@dataclass
class Shout:
    name: str = "shout"
    phase: Phase = Phase.OUTPUT_GUARD

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> Upper | None:
        head.headers.append((b"x-shouted", b"1"))
        return Upper() if ctx.route.name == "loud" else None


def factory(route: CompiledRoute, build: BuildContext) -> list[object]:
    # registered out of order on purpose: the phases decide the order
    return [
        Recorder("guard", Phase.INPUT_GUARD, needs_body=True),
        Recorder("limit", Phase.RATE_LIMIT),
        Recorder("auth", Phase.AUTH),
        Shout(),
    ]


async def _run(mock: MockLLM) -> None:
    policy = load_policy_text(
        f"version: 1\nupstream: {{url: '{mock.url}'}}\n"
        "routes:\n  - {name: loud, path: /echo/loud}\n"
    )
    pipeline = Pipeline(policy, (factory,))
    app = GatewayApp(pipeline)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        ORDER.clear()
        resp = await client.post("/echo/quiet", content=b"12345")
        assert ORDER == ["auth", "limit", "guard"]
        assert resp.headers["x-shouted"] == "1"
        assert json.loads(resp.content)["headers"]["x-body-len"] == "5"

        ORDER.clear()
        resp = await client.post("/echo/deny", content=b"x")
        assert ORDER == ["auth", "limit"]  # stopped before the body was read
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "rate_limited"

        resp = await client.get("/echo/loud")
        assert b'"METHOD":"GET"' in resp.content  # the buffered filter rewrote the body
        assert resp.headers["content-length"] == str(len(resp.content))
    await pipeline.close()


def test_stages_run_in_phase_order_and_can_deny_and_filter(mock_llm: MockLLM) -> None:
    asyncio.run(_run(mock_llm))
