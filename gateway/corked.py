"""A transport wrapper that coalesces the writes of one event-loop turn (the HTTP server's).

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and the body
in a second write; on loopback each write is a syscall that also runs the peer's receive path.
Buffering the writes of one loop turn and flushing them together makes a small answer one
write instead of two (measured: ``python -m bench.proxy``, see the README's speed section).
Streaming is unchanged: each chunk still leaves at the end of the turn it was sent in.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CorkedTransport:
    """A transport whose ``write`` calls of one loop turn go out as one write."""

    __slots__ = ("_buf", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buf: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue ``data``; it leaves at the end of this loop turn."""
        if not data:
            return
        if not self._buf:
            self._loop.call_soon(self.flush)
        self._buf.append(data)

    def flush(self) -> None:
        """Write what is queued now."""
        if not self._buf:
            return
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        self._buf.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Flush, then close (the kernel still sends what was written)."""
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        """Flush, then half-close."""
        self.flush()
        self._transport.write_eof()

    def is_closing(self) -> bool:
        """As the real transport."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the real transport."""
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
