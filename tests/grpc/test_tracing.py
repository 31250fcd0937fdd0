"""Spans of gRPC calls: exported to a real OTLP receiver, sampled as the HTTP side is.

``telemetry.sample_ratio`` decides for a call without a parent, the client's sampled flag
for a call with a valid ``traceparent`` (parent-based), on the gRPC listener as on HTTP.
"""

from __future__ import annotations

from tests.grpc.conftest import EchoService, StartGrpcGateway, Stubs, channel, plaintext_policy
from tests.otlp_receiver import OtlpReceiver

TRACE = "0af7651916cd43dd8448eb211c80319c"


def _telemetry(otlp: OtlpReceiver, ratio: float) -> str:
    return f'telemetry: {{otlp_endpoint: "{otlp.url}", sample_ratio: {ratio}}}\n'


def _calls(address: str, stubs: Stubs, count: int, parent_flags: str | None = None) -> None:
    md = [("traceparent", f"00-{TRACE}-b7ad6b7169203331-{parent_flags}")] if parent_flags else []
    with channel(address) as ch:
        stub = stubs.grpc.EchoStub(ch)
        for _ in range(count):
            assert stub.Unary(stubs.pb2.Msg(text="t"), metadata=md, timeout=5).text == "t"


def test_sample_ratio_zero_records_no_call_but_a_sampled_parent_is_followed(
    otlp: OtlpReceiver, start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(plaintext_policy(_telemetry(otlp, 0.0)), echo.address)
    _calls(gw.grpc_address, stubs, 20)
    _calls(gw.grpc_address, stubs, 3, parent_flags="00")  # the client's parent: not sampled
    _calls(gw.grpc_address, stubs, 1, parent_flags="01")  # sampled: followed
    gw.stop()  # flushes the export queue
    names = [(s["name"], s["trace_id"]) for s in otlp.wait_for(2, timeout=3)]
    assert sorted(names) == [("echo.Echo/Unary", TRACE), ("upstream", TRACE)]


def test_sample_ratio_one_records_every_call(
    otlp: OtlpReceiver, start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(plaintext_policy(_telemetry(otlp, 1.0)), echo.address)
    _calls(gw.grpc_address, stubs, 5)
    gw.stop()
    servers = [s for s in otlp.wait_for(10) if s["name"] == "echo.Echo/Unary"]
    assert len(servers) == 5
    assert servers[0]["attributes"]["rpc.system"] == "grpc"
    assert len({s["trace_id"] for s in servers}) == 5
