"""The real ``openai`` SDK pointed at the gateway in front of the mock LLM service."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai

from tests.procs import Gateway, MockLLM

POLICY = """
version: 1
upstream: {url: "{upstream}"}
routes:
  - {name: chat, path: /v1/chat/completions, methods: [POST], layer: layer3}
"""


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


def test_chat_plain(start_gateway: Callable[..., Gateway], mock_llm: MockLLM) -> None:
    gw = start_gateway(POLICY, mock_llm.url)
    reply = client(gw).chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "hello gateway"}]
    )
    assert reply.choices[0].message.content == "Echo: hello gateway"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_chat_streaming(start_gateway: Callable[..., Gateway], mock_llm: MockLLM) -> None:
    gw = start_gateway(POLICY, mock_llm.url)
    stream = client(gw).chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish = None
    usage = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == "Echo: one two three"
    assert finish == "stop"
    assert usage is not None and usage.total_tokens > 0


def test_completions(start_gateway: Callable[..., Gateway], mock_llm: MockLLM) -> None:
    gw = start_gateway(POLICY, mock_llm.url)
    reply = client(gw).completions.create(model="mock-gpt", prompt="say this")
    assert reply.choices[0].text == "Echo: say this"


def test_gateway_error_parses_as_api_error(
    start_gateway: Callable[..., Gateway], mock_llm: MockLLM
) -> None:
    gw = start_gateway(POLICY.replace("{upstream}", "http://127.0.0.1:9"), "")
    try:
        client(gw).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    except openai.APIStatusError as exc:
        assert exc.status_code == 502
        assert isinstance(exc.body, dict) and exc.body.get("type") == "upstream_unavailable"
    else:
        raise AssertionError("expected a 502")


LLM_POLICY = """
version: 1
upstream: {url: "{upstream}"}
cost: {models: {mock-gpt: {input_per_1k: 1, output_per_1k: 2}}}
routes:
  - {name: chat, path: /v1/chat/completions, methods: [POST], layer: layer3}
"""


def test_stream_usage_counted_without_the_client_asking(
    start_gateway: Callable[..., Gateway], mock_llm: MockLLM
) -> None:
    gw = start_gateway(LLM_POLICY, mock_llm.url)
    stream = client(gw).chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk reached the client
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: one two three"
    deadline = time.monotonic() + 5
    while gw.metric("llm_tokens_total", {"model": "mock-gpt", "type": "output"}) == 0:
        assert time.monotonic() < deadline, "no usage recorded"
        time.sleep(0.05)
    assert gw.metric("llm_tokens_total", {"model": "mock-gpt", "type": "output"}) == 4
    assert gw.metric("llm_usage_estimated_total") == 0
