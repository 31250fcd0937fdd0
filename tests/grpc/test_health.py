"""The standard health service, answered from the gateway's readiness, and the drain."""

from __future__ import annotations

import queue
import signal
import threading
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.grpc.conftest import EchoService, StartGrpcGateway, Stubs, channel, plaintext_policy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def watch(ch: grpc.Channel) -> tuple[queue.Queue[int], grpc.Future]:
    """A Watch call whose answers land in a queue (read by a thread)."""
    stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    seen: queue.Queue[int] = queue.Queue()

    def read() -> None:
        try:
            for answer in stream:
                seen.put(answer.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return seen, stream


def test_health_follows_readiness(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(plaintext_policy(), echo.address)
    with channel(gw.grpc_address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = health_pb2.HealthCheckRequest()
        assert health.Check(check, timeout=5).status == SERVING
        named = health_pb2.HealthCheckRequest(service="echo.Echo")
        assert health.Check(named, timeout=5).status == SERVING
        listed = health.List(health_pb2.HealthListRequest(), timeout=5)  # type: ignore[attr-defined]
        assert listed.statuses[""].status == SERVING
        seen, stream = watch(ch)
        assert seen.get(timeout=5) == SERVING
        echo.stop()  # the gRPC upstream is gone: not ready
        assert seen.get(timeout=10) == NOT_SERVING
        assert health.Check(check, timeout=5).status == NOT_SERVING
        ready = httpx.get(f"{gw.admin}/readyz")
        assert ready.status_code == 503
        assert "grpc.upstream: unreachable" in ready.json()["failing"]
        echo.restart()
        assert seen.get(timeout=10) == SERVING
        assert health.Check(check, timeout=5).status == SERVING
        assert httpx.get(f"{gw.admin}/readyz").status_code == 200
        stream.cancel()


def test_health_is_not_serving_when_the_http_readiness_fails(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService
) -> None:
    """The same checks as /readyz: here the HTTP upstream is unreachable."""
    gw = start_grpc_gateway(plaintext_policy(), echo.address, http_upstream="http://127.0.0.1:9")
    with channel(gw.grpc_address) as ch:
        answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == NOT_SERVING
    assert httpx.get(f"{gw.admin}/readyz").json()["failing"] == ["upstream"]


def test_drain_finishes_calls_in_flight(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(plaintext_policy(extra="drain_timeout: 5s\n"), echo.address)
    with channel(gw.grpc_address) as ch:
        stub = stubs.grpc.EchoStub(ch)
        seen, _ = watch(ch)
        assert seen.get(timeout=5) == SERVING
        slow = stub.Sleep.future(stubs.pb2.Msg(text="drain", delay_ms=1500), timeout=10)
        time.sleep(0.3)
        gw.signal(signal.SIGTERM)
        assert seen.get(timeout=5) == NOT_SERVING
        assert slow.result(timeout=10).text == "drain"  # finished within the grace
        gw.popen.wait(10)
    assert gw.popen.returncode == 0
    assert "grpc listener draining" in gw.log()
