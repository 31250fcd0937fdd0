"""A misbehaving HTTP/1.1 upstream for fault tests, run on a thread's own event loop.

Paths choose the behaviour: ``/slow`` waits 10 s before answering, ``/reset`` sends a chunked
head and two chunks then resets the connection, ``/garbage`` answers a non-HTTP line,
``/short`` declares 100 bytes and sends 9, ``/badchunk`` sends one chunk then an invalid
chunk size,
``/ok`` answers 200 at once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from tests.procs import free_port


class RawUpstream:
    """Start with ``start()``, stop with ``stop()``; ``url`` is its base URL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> RawUpstream:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        )
        self._server = fut.result(5)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        path = head.split(b" ", 2)[1]
        if path.startswith(b"/slow"):
            await asyncio.sleep(10)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        elif path.startswith(b"/reset"):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                b"d\r\ndata: first\n\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"e\r\ndata: second\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            sock = writer.get_extra_info("socket")
            if sock is not None:  # RST instead of FIN: an abrupt crash
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        elif path.startswith(b"/short"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
            await writer.drain()
            writer.transport.abort()
            return
        elif path.startswith(b"/badchunk"):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"zz\r\nnot a chunk size\r\n")
        elif path.startswith(b"/garbage"):
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        try:
            await writer.drain()
            writer.close()
        except ConnectionError:
            pass
