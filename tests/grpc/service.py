"""The Echo test service as a real process: ``python -m tests.grpc.service --port N --stubs DIR``.

With ``--cert/--key`` it serves TLS, with ``--ca`` too it requires client certificates
(mutual TLS), like a service in the pod would. It answers what it saw (metadata, deadline,
the client certificate's name) so the tests can check what the gateway forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.grpc.stubs import load

EVENTS: list[str] = []


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            seen[key] = value if key not in seen else seen[key] + "," + value
    return seen


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    left = context.time_remaining()
    return 0.0 if left is None or left > 1e6 else float(left)


def _peer_cn(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return b",".join(names).decode()


def build(pb2: Any, pb2_grpc: Any) -> Any:
    """The servicer class (made here because the stubs are imported at run time)."""

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc]
        async def Unary(self, request: Any, context: Any) -> Any:
            await context.send_initial_metadata((("x-echo-initial", "yes"),))
            context.set_trailing_metadata((("x-echo-trailing", "done"),))
            return pb2.Msg(
                text=request.text,
                blob=request.blob,
                deadline_s=_deadline(context),
                metadata=_metadata(context),
                peer_cn=_peer_cn(context),
            )

        async def ServerStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
            for i in range(request.count):
                if request.delay_ms and i:
                    await asyncio.sleep(request.delay_ms / 1000)
                yield pb2.Msg(text=f"{request.text}-{i}", count=i)

        async def ClientStream(self, request_iterator: Any, context: Any) -> Any:
            texts = [m.text async for m in request_iterator]
            return pb2.Msg(text="+".join(texts), count=len(texts))

        async def BidiStream(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
            watch = False
            if ("x-greet", "1") in tuple(context.invocation_metadata() or ()):
                yield pb2.Msg(text="HELLO")  # the service speaks first
            try:
                async for m in request_iterator:
                    watch = watch or m.count < 0
                    yield pb2.Msg(text=m.text.upper(), count=m.count)
                if watch:
                    # A cancel also ends the request stream here (grpc reads it as the end
                    # of input): wait a moment for the call to show it was cancelled.
                    await asyncio.sleep(0.3)
                    if context.cancelled():
                        EVENTS.append("cancelled bidi")
                    yield pb2.Msg(text="END")
            except (asyncio.CancelledError, GeneratorExit):
                EVENTS.append("cancelled bidi")
                raise

        async def Sleep(self, request: Any, context: Any) -> Any:
            try:
                await asyncio.sleep(request.delay_ms / 1000)
            except asyncio.CancelledError:
                EVENTS.append(f"cancelled {request.text}")
                raise
            return pb2.Msg(text=request.text, deadline_s=_deadline(context))

        async def Fail(self, request: Any, context: Any) -> Any:
            info = error_details_pb2.ErrorInfo(reason="TEST_REASON", domain="echo.test")
            detail = any_pb2.Any()
            detail.Pack(info)
            rich = status_pb2.Status(code=request.code, message=request.text, details=[detail])
            await context.abort(
                grpc.StatusCode(_code(request.code)),
                request.text,
                (
                    ("x-fail-trailing", "t1"),
                    ("x-fail-bin", b"\x00\x01\xff"),
                    ("grpc-status-details-bin", rich.SerializeToString()),
                ),
            )

        async def Events(self, request: Any, context: Any) -> Any:
            return pb2.Msg(text="\n".join(EVENTS))

    return Echo()


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    raise ValueError(number)


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM."""
    pb2, pb2_grpc = load(Path(args.stubs))
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    pb2_grpc.add_EchoServicer_to_server(build(pb2, pb2_grpc), server)
    address = f"127.0.0.1:{args.port}"
    if args.cert:
        key, cert = Path(args.key), Path(args.cert)
        ca = Path(args.ca) if args.ca else None
        creds = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],  # noqa: ASYNC240 (start-up)
            root_certificates=ca.read_bytes() if ca else None,
            require_client_auth=ca is not None,
        )
        server.add_secure_port(address, creds)
    else:
        server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    """Parse the arguments and serve."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--stubs", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--ca")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
