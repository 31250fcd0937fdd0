"""Attack clients run as their own process (``python -m tests.hardening.attacker KIND ...``),
so the test process that probes health and sends normal traffic is not slowed by them.

Kinds: ``slowloris`` (heads sent one byte at a time, never finished), ``slowbody`` (a head
with ``Content-Length`` then a few body bytes and a stall), ``flood`` (idle connections that
never send a byte, reopened when closed). Each keeps ``--conns`` connections going for
``--duration`` seconds and prints one JSON line of counts at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

HEAD = b"GET /echo/slow HTTP/1.1\r\nHost: x\r\nX-Pad: "
PATH = b"/echo/slow"  # the slow bodies' target (--path)


async def _slowloris(port: int, stop: float, stats: Counter[str]) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        stats["opened"] += 1
        try:
            writer.write(HEAD)
            while time.monotonic() < stop:
                await asyncio.sleep(0.5)
                writer.write(b"a")  # never the blank line that ends the head
                await writer.drain()
                if reader.at_eof():
                    break
        except OSError:
            pass
        answer = await _drain(reader)
        stats[f"answer_{answer[:12].decode('latin-1')}"] += 1
        writer.close()


async def _slowbody(port: int, stop: float, stats: Counter[str]) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        stats["opened"] += 1
        try:
            writer.write(
                b"POST " + PATH + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab"
            )
            await writer.drain()
        except OSError:
            pass
        answer = await _drain(reader, max(0.1, stop - time.monotonic()))
        stats[f"answer_{answer[:12].decode('latin-1')}"] += 1
        writer.close()


async def _flood(port: int, stop: float, stats: Counter[str]) -> None:
    # Idle connections that never send a byte: they occupy a connection slot until the
    # server closes them (header_read_timeout, or at once when over max_connections).
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_failed"] += 1
            await asyncio.sleep(0.05)
            continue
        stats["opened"] += 1
        answer = await _drain(reader, max(0.1, stop - time.monotonic()))
        stats["closed_by_server" if time.monotonic() < stop else "held"] += 1
        if answer:
            stats[f"answer_{answer[:12].decode('latin-1')}"] += 1
        writer.close()


async def _drain(reader: asyncio.StreamReader, wait: float = 60.0) -> bytes:
    data = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                data += chunk
    except (TimeoutError, OSError):
        pass
    return data


async def main(kind: str, port: int, conns: int, duration: float) -> Counter[str]:
    """Run ``conns`` attack loops of ``kind`` for ``duration`` seconds."""
    stats: Counter[str] = Counter()
    stop = time.monotonic() + duration
    attack = {"slowloris": _slowloris, "slowbody": _slowbody, "flood": _flood}[kind]
    tasks = [asyncio.create_task(attack(port, stop, stats)) for _ in range(conns)]
    await asyncio.wait(tasks, timeout=duration + 30)
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["slowloris", "slowbody", "flood"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--path", default="/echo/slow")
    args = parser.parse_args()
    PATH = args.path.encode()
    counts = asyncio.run(main(args.kind, args.port, args.conns, args.duration))
    print(json.dumps(dict(counts)), flush=True)
