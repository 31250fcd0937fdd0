"""CPU time of each stage of the full chain, one request at a time, in-process.

    python -m bench.stages [--requests 2000] [--rounds 6] [--memory]

Builds the pipeline of ``bench.speed``'s full-chain policy (tracing off: spans are measured by
``bench.speed``), starts its own ``redis-server`` (``--memory``: the in-process store), and
runs one 1 KB chat request through every stage: request stages, both response stages on the
bench answer, the finishers and the access record. Prints the process time of each (µs a
request, the best of ``--rounds`` rounds, since this VM's noise only ever adds) and the total.
It locates a regression or a gain; the throughput that matters is ``bench.speed``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import free_port, json_body, stop_process, wait_port
from bench.speed import ANSWER, PATH, SECRET, full_chain_policy, start_redis


def _policy(redis_port: int | None) -> str:
    text = full_chain_policy(redis_port or 1, 1)
    text = text.replace('otlp_endpoint: "http://127.0.0.1:1", ', "")
    if redis_port is None:
        text = text.replace('url: "redis://127.0.0.1:1/0", ', 'url: "memory://", ')
    return "version: 1\nupstream: {url: 'http://127.0.0.1:9'}\n" + text


async def measure(policy_text: str, requests: int, rounds: int) -> dict[str, float]:
    """µs of process time a request, per stage (best round)."""
    from gateway.context import RequestContext
    from gateway.pipeline import Pipeline, ResponseHead
    from gateway.policy import load_policy_text
    from gateway.stages import FACTORIES
    from gateway.tokens import mint_token

    policy = load_policy_text(policy_text)
    pipe = Pipeline(policy, FACTORIES)
    await pipe.start()
    route = pipe.router.match("POST", PATH)
    token = mint_token(policy, "bench", "pro", 3600)
    headers = [
        (b"authorization", b"Bearer " + token.encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"1024"),
    ]
    body, answer = json_body(1024), ANSWER.encode()
    scope: dict[str, Any] = {"type": "http", "headers": headers, "query_string": b""}
    best: dict[str, int] = {}
    clock = time.process_time_ns
    for _ in range(rounds):
        spent: dict[str, int] = {}
        for _ in range(requests):
            ctx = RequestContext(scope, "r", route, "POST", PATH, "192.0.2.1", headers)
            for stage in route.before_body:
                t0 = clock()
                deny = await stage.on_request(ctx)
                spent[stage.name] = spent.get(stage.name, 0) + clock() - t0
                assert deny is None, deny
            ctx.body = body
            for stage in route.after_body:
                t0 = clock()
                deny = await stage.on_request(ctx)
                spent[stage.name] = spent.get(stage.name, 0) + clock() - t0
                assert deny is None, deny
            head = ResponseHead(
                200,
                [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))],
            )
            # As gateway.app does: every stage sees the head, then the filters see the body.
            found = []
            for stage in route.response:
                t0 = clock()
                found.append((stage.name, stage.on_response(ctx, head)))
                key = "answer:" + stage.name
                spent[key] = spent.get(key, 0) + clock() - t0
            for name, body_filter in found:
                if body_filter is not None:
                    t0 = clock()
                    await body_filter.on_chunk(answer)
                    await body_filter.on_end()
                    key = "answer:" + name
                    spent[key] = spent.get(key, 0) + clock() - t0
            t0 = clock()
            for stage in route.finishers:
                stage.on_finish(ctx)
            pipe.recorder.finish(ctx)
            spent["finish+record"] = spent.get("finish+record", 0) + clock() - t0
        await asyncio.sleep(0.05)  # settlements in flight land outside the measured time
        for name, ns in spent.items():
            best[name] = min(best.get(name, ns), ns)
    await pipe.close()
    return {name: ns / requests / 1000 for name, ns in best.items()}


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--memory", action="store_true", help="in-process store, no Redis")
    args = parser.parse_args()
    os.environ["BENCH_JWT_SECRET"] = SECRET
    redis = None
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        port = None
        if not args.memory:
            port = free_port()
            redis = start_redis(port, Path(tmp))
            wait_port(port)
        try:
            import uvloop

            result = uvloop.run(measure(_policy(port), args.requests, args.rounds))
        finally:
            if redis is not None:
                stop_process(redis)
    for name, us in result.items():
        print(f"{name:24s} {us:7.1f} µs")
    print(f"{'total':24s} {sum(result.values()):7.1f} µs")


if __name__ == "__main__":
    sys.exit(main())
