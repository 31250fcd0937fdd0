"""``write_head`` leaves uvicorn's cycle as uvicorn's own ``send`` would: same bytes, state
and errors, for any head (and declines without touching the cycle when it does not)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.response_head import write_head


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _cycle(method: str, keep_alive: bool, expect: bool = False) -> Any:
    transport = _Transport()
    return RequestResponseCycle(
        scope={"method": method},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=expect,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


def _state(cycle: Any) -> tuple[Any, ...]:
    return (
        b"".join(cycle.transport.written),
        cycle.response_started,
        cycle.response_complete,
        cycle.chunked_encoding,
        cycle.expected_content_length,
        cycle.keep_alive,
        cycle.waiting_for_100_continue,
        cycle.transport.closed,
    )


def _run(cycle: Any, messages: list[dict[str, Any]], bulk: bool) -> tuple[Any, ...]:
    """What the cycle ends as after ``messages``: error (type and text) and state."""
    error = None
    for message in messages:
        try:
            if bulk and message["type"] == "http.response.start":
                before = _state(cycle)
                if write_head(cycle, message):
                    continue
                assert _state(cycle) == before  # declined: nothing done
            asyncio.run(cycle.send(message))
        except Exception as exc:  # the same error type and text is what is compared
            error = (type(exc), str(exc))
            break
    return error, _state(cycle)


GOOD_NAMES = st.sampled_from(
    [b"content-type", b"x-request-id", b"ratelimit-limit", b"traceparent", b"date",
     b"connection", b"transfer-encoding", b"content-length", b"x-a1"]
)  # fmt: skip
ODD_NAMES = st.one_of(
    st.sampled_from(
        [b"Content-Type", b"X-Upper", b"bad name", b"bad:name", b"", b"x-\x00", b"x-\x7f",
         b"123", b"x-a(b", b"Content-Length", b"Connection"]
    ),
    st.binary(max_size=12),
)  # fmt: skip
GOOD_VALUES = st.sampled_from(
    [b"application/json", b"close", b"keep-alive, close", b"chunked", b"Chunked", b"0", b"12",
     b"a\tb", b"", b"caf\xc3\xa9", b"5"]
)  # fmt: skip
ODD_VALUES = st.one_of(
    st.sampled_from([b"abc", b"a\nb", b"a\rb", b"\x00", b"\x7f", b"-1"]), st.binary(max_size=12)
)
#: Mostly heads written in bulk, some left to uvicorn.
HEADERS = st.lists(
    st.tuples(
        st.one_of(GOOD_NAMES, GOOD_NAMES, GOOD_NAMES, ODD_NAMES),
        st.one_of(GOOD_VALUES, GOOD_VALUES, GOOD_VALUES, ODD_VALUES),
    ),
    max_size=12,
)


@settings(max_examples=1500, deadline=None)
@given(
    headers=HEADERS,
    status=st.sampled_from([200, 201, 204, 304, 404, 429, 502, 599]),
    method=st.sampled_from(["GET", "POST", "HEAD"]),
    keep_alive=st.booleans(),
    expect=st.booleans(),
    body=st.sampled_from([b"", b"hello", b"x" * 12]),
)
@example([(b"connection", b"close"), (b"content-length", b"5")], 200, "GET", True, False, b"hello")
@example([(b"transfer-encoding", b"chunked")], 200, "POST", True, False, b"hello")
@example([(b"content-type", b"text/plain")], 304, "GET", True, False, b"")
@example([(b"content-type", b"text/plain")], 204, "GET", False, True, b"")
def test_the_same_as_uvicorn(
    headers: list[tuple[bytes, bytes]],
    status: int,
    method: str,
    keep_alive: bool,
    expect: bool,
    body: bytes,
) -> None:
    messages = [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]
    theirs = _run(_cycle(method, keep_alive, expect), messages, bulk=False)
    ours = _run(_cycle(method, keep_alive, expect), messages, bulk=True)
    assert ours == theirs


def test_the_gateway_head_is_written_in_bulk() -> None:
    cycle = _cycle("POST", True)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    assert write_head(cycle, {"type": "http.response.start", "status": 200, "headers": headers})
    assert cycle.transport.written == [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
    ]
    assert (cycle.chunked_encoding, cycle.expected_content_length) == (False, 2)
    again = {"type": "http.response.start", "status": 200, "headers": headers}
    assert not write_head(cycle, again)  # a second head is uvicorn's to refuse


def test_the_app_writes_uvicorns_plain_heads_in_bulk(monkeypatch: Any) -> None:
    """The send the gateway's app wraps around uvicorn's cycle takes the bulk path for a
    plain head (uvicorn's ``send`` is not called for it) and still marks the answer started;
    a head it declines goes to uvicorn's ``send``."""
    from gateway.app import _State, _tracking

    handed: list[Any] = []
    uvicorn_send = RequestResponseCycle.send

    async def spy(self: Any, message: Any) -> None:
        handed.append(message["type"])
        await uvicorn_send(self, message)

    monkeypatch.setattr(RequestResponseCycle, "send", spy)
    plain = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    for headers, expected in ((plain, []), ([(b"X-Upper", b"1")], ["http.response.start"])):
        cycle, state = _cycle("POST", True), _State()
        send = _tracking(cycle.send, state)
        handed.clear()
        asyncio.run(send({"type": "http.response.start", "status": 200, "headers": headers}))
        assert handed == expected and state.started and cycle.response_started
