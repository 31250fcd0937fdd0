"""``gateway demo``: the mock LLM service and the gateway in one process, ready to try."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from gateway.demo.mock_llm import MockLLMConfig
from gateway.demo.mock_llm import serve as serve_mock
from gateway.policy import load_policy
from gateway.policy.types import split_hostport
from gateway.server import Overrides, serve
from gateway.tokens import mint_token


def _instructions(policy_path: Path, listen: str, token: str | None) -> str:
    host, port = split_hostport(listen)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    auth = ' -H "Authorization: Bearer $TOKEN"' if token else ""
    body = '{"model":"mock-gpt","messages":[{"role":"user","content":"Hello there"}]}'
    stream = body[:-1] + ',"stream":true}'
    unsafe = '{"model":"mock-gpt","messages":[{"role":"user","content":"[[unsafe]] hi"}]}'
    lines = [
        "",
        f"gateway demo: policy {policy_path}, gateway on {base}, mock LLM behind it",
        "",
        f"  export TOKEN={token}" if token else "  (the policy has no auth)",
        "",
        "  # a chat completion",
        f"  curl -s {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f"       -d '{body}'",
        "",
        "  # the same, streamed (server-sent events arrive one by one)",
        f"  curl -sN {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f"       -d '{stream}'",
        "",
        "  # the mock answers unsafely when asked to (guardrails replace such answers)",
        f"  curl -s {base}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\",
        f"       -d '{unsafe}'",
        "",
        "  # without a token",
        f"  curl -s {base}/v1/chat/completions -d '{body}'",
        "",
        "Press Ctrl+C to stop.",
        "",
    ]
    return "\n".join(lines)


async def run_demo(policy_path: Path, mock_listen: str) -> int:
    """Start the mock LLM service and the gateway, print how to try them, serve until Ctrl+C."""
    if not policy_path.is_file():  # noqa: ASYNC240 - once, before anything runs
        print(f"gateway demo: {policy_path} not found (run it from the repository root)")
        return 1
    # The demo policy reads its secret from the environment; make one up for this run.
    os.environ.setdefault("GATEWAY_JWT_SECRET", secrets.token_urlsafe(32))
    policy = load_policy(policy_path)
    host, port = split_hostport(mock_listen)
    mock = asyncio.get_running_loop().create_task(
        serve_mock(host, port, MockLLMConfig(token_latency=0.02))
    )
    token = mint_token(policy, "demo-user", "free", 3600) if policy.auth else None
    print(_instructions(policy_path, policy.listen, token), flush=True)
    try:
        return await serve(policy_path, Overrides(upstream=f"http://{host}:{port}"))
    finally:
        mock.cancel()
