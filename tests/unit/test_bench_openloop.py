"""The fixed-rate generator (``bench/openloop.c``) keeps its connections alive.

The speed issue's "added at 500 req/s" figures are only about the gateway's request path if
the generator reuses its keep-alive connections, as a sidecar's clients do; a connection per
request measures accept, TCP setup and close instead. Needs a C compiler (CI has gcc).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench._util import openloop_binary, run_wrk

ANSWER = b'{"ok":true}'


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections = 0
    lock = threading.Lock()

    def setup(self) -> None:
        with _Counting.lock:
            _Counting.connections += 1
        super().setup()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Counting.connections = 0
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_connections_are_reused(server: int) -> None:
    assert openloop_binary() is not None, "bench/openloop.c did not build: is gcc installed?"
    run = run_wrk(
        f"http://127.0.0.1:{server}/x",
        connections=4,
        duration_s=1,
        rate=200,
        method="POST",
        body=b'{"a":1}',
    )
    assert run["generator"] == "c-openloop"
    assert run["errors"] == 0 and run["non_2xx"] == 0
    assert run["requests"] >= 190
    # Every request on one of the 4 connections it opened at the start.
    assert _Counting.connections <= 4
