"""The HTTP side's policy on gRPC calls: JWT identity, limits (memory and Redis), routes."""

from __future__ import annotations

import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from jose import jwt

from tests.grpc.conftest import (
    EchoService,
    StartGrpcGateway,
    Stubs,
    channel,
    handled,
    plaintext_policy,
)
from tests.redis_procs import RedisServer, redis_server

__all__ = ["redis_server"]  # the module-scoped fixture

SECRET = "grpc-test-secret-0123456789abcdef"
ENV = {"GRPC_TEST_SECRET": SECRET}
AUTH = "auth: {secret: {env: GRPC_TEST_SECRET}}\n"


def bearer(sub: str, tier: str = "free", secret: str = SECRET) -> tuple[str, str]:
    """``authorization`` metadata for ``sub`` in ``tier``."""
    claims = {"sub": sub, "tier": tier, "exp": int(time.time()) + 600}
    return ("authorization", "Bearer " + jwt.encode(claims, secret, algorithm="HS256"))


def error(call: object, stubs: Stubs, md: list[tuple[str, str]]) -> grpc.RpcError:
    """The error of a Unary call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(stubs.pb2.Msg(text="x"), metadata=md, timeout=5)  # type: ignore[operator]
    return info.value


def test_jwt_from_authorization_metadata(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(plaintext_policy(AUTH), echo.address, env=ENV)
    with channel(gw.grpc_address) as ch:
        unary = stubs.grpc.EchoStub(ch).Unary
        err = error(unary, stubs, [])
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        trailing = dict(err.trailing_metadata())  # type: ignore[attr-defined]
        assert trailing["x-gateway-error"] == "missing_token"
        assert trailing["www-authenticate"] == 'Bearer realm="gateway"'
        assert "x-request-id" in trailing
        for bad in (
            [("authorization", "Bearer not.a.token")],
            [bearer("mallory", secret="another-secret-0123456789abcdef")],
            [("authorization", "Basic dXNlcjpwYXNz")],
        ):
            err = error(unary, stubs, bad)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, bad  # type: ignore[attr-defined]
        reply = unary(
            stubs.pb2.Msg(text="me"),
            metadata=[bearer("alice", "pro"), ("x-user-id", "root"), ("x-user-tier", "admin")],
            timeout=5,
        )
        seen = dict(reply.metadata)
        assert (seen["x-user-id"], seen["x-user-tier"]) == ("alice", "pro")
        assert seen["authorization"].startswith("Bearer ")  # forwarded, as on HTTP
        # A sub that is not printable ASCII travels percent-encoded (metadata is ASCII).
        reply = unary(stubs.pb2.Msg(text="u"), metadata=[bearer("zoë 100%")], timeout=5)
        assert dict(reply.metadata)["x-user-id"] == "zo%C3%AB 100%25"
    assert handled(gw, "Unary", "UNAUTHENTICATED") == 4
    assert gw.metric("gateway_auth_failures_total", {"reason": "missing_token"}) == 2
    assert gw.metric("gateway_auth_failures_total", {"reason": "bad_signature"}) == 1


def test_health_needs_no_token(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gw = start_grpc_gateway(plaintext_policy(AUTH), echo.address, env=ENV)
    with channel(gw.grpc_address) as ch:
        answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _retry_delay(err: grpc.RpcError) -> int:
    trailing = dict(err.trailing_metadata())  # type: ignore[attr-defined]
    rich = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.RetryInfo()
    assert rich.details[0].Unpack(info)
    assert str(info.retry_delay.seconds) == trailing["retry-after"]
    return int(info.retry_delay.seconds)


def test_tier_and_peer_limits(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    limits = AUTH.replace("}}", "}, required: false}") + (
        "rate_limits:\n  per_ip: 6/hour\n  per_tier: {free: 2/hour}\n"
    )
    gw = start_grpc_gateway(plaintext_policy(limits), echo.address, env=ENV)
    with channel(gw.grpc_address) as ch:
        unary = stubs.grpc.EchoStub(ch).Unary
        bob = [bearer("bob", "free")]
        assert unary(stubs.pb2.Msg(text="1"), metadata=bob, timeout=5).text == "1"
        assert unary(stubs.pb2.Msg(text="2"), metadata=bob, timeout=5).text == "2"
        err = error(unary, stubs, bob)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "scope tier" in err.details()  # type: ignore[attr-defined]
        assert 1 <= _retry_delay(err) <= 3600
        trailing = dict(err.trailing_metadata())  # type: ignore[attr-defined]
        assert trailing["ratelimit-remaining"] == "0" and trailing["ratelimit-limit"] == "2"
        # Another user of the same peer still has room until the peer's limit (6) is used.
        carol = [bearer("carol", "free")]
        assert unary(stubs.pb2.Msg(text="3"), metadata=carol, timeout=5).text == "3"
        anonymous: list[tuple[str, str]] = []
        assert unary(stubs.pb2.Msg(text="4"), metadata=anonymous, timeout=5).text == "4"
        assert unary(stubs.pb2.Msg(text="5"), metadata=anonymous, timeout=5).text == "5"
        assert unary(stubs.pb2.Msg(text="6"), metadata=anonymous, timeout=5).text == "6"
        err = error(unary, stubs, anonymous)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "scope ip" in err.details()  # type: ignore[attr-defined]
        _retry_delay(err)
    assert handled(gw, "Unary", "RESOURCE_EXHAUSTED") == 2
    assert gw.metric("gateway_ratelimit_rejections_total", {"scope": "tier"}) == 1
    assert gw.metric("gateway_ratelimit_rejections_total", {"scope": "ip"}) == 1


def test_a_route_gives_one_service_its_own_limit(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    routes = (
        "routes:\n  - {name: events, path: /echo.Echo/Events, rate_limits: {per_route: 1/hour}}\n"
    )
    gw = start_grpc_gateway(plaintext_policy(routes), echo.address)
    with channel(gw.grpc_address) as ch:
        stub = stubs.grpc.EchoStub(ch)
        stub.Events(stubs.pb2.Msg(), timeout=5)
        err = error(stub.Events, stubs, [])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        for _ in range(3):  # other methods are not limited
            assert stub.Unary(stubs.pb2.Msg(text="free"), timeout=5).text == "free"


def test_limits_shared_through_redis(
    start_grpc_gateway: StartGrpcGateway,
    echo: EchoService,
    stubs: Stubs,
    redis_server: RedisServer,
) -> None:
    """Two gateway replicas with one Redis: the peer limit counts calls through both."""
    state = f'state: {{url: "{redis_server.url}", key_prefix: grpctest{time.time_ns()}}}\n'
    policy = plaintext_policy(state + "rate_limits: {per_ip: 3/hour}\n")
    gateways = [start_grpc_gateway(policy, echo.address) for _ in range(2)]
    codes = []
    for i in range(5):
        with channel(gateways[i % 2].grpc_address) as ch:
            try:
                stubs.grpc.EchoStub(ch).Unary(stubs.pb2.Msg(text="r"), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())  # type: ignore[attr-defined]
    ok, limited = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes == [ok, ok, ok, limited, limited]


def test_a_policy_reload_applies_to_new_calls(
    start_grpc_gateway: StartGrpcGateway, echo: EchoService, stubs: Stubs
) -> None:
    import signal

    gw = start_grpc_gateway(plaintext_policy(), echo.address, env=ENV)
    with channel(gw.grpc_address) as ch:
        unary = stubs.grpc.EchoStub(ch).Unary
        assert unary(stubs.pb2.Msg(text="open"), timeout=5).text == "open"
        gw.policy.write_text(gw.policy.read_text() + AUTH)
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "policy reloaded" not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.05)
        err = error(unary, stubs, [])
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        token = bearer("dave")
        assert unary(stubs.pb2.Msg(text="in"), metadata=[token], timeout=5).text == "in"
    log = gw.log()
    assert '"msg": "grpc call"' in log and '"user": "dave"' in log
    assert token[1].split()[1] not in log  # the token is never logged
