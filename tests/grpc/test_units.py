"""The gRPC pieces without processes: the policy section, metadata rules, refusals, labels,
certificate checks."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway.errors import Deny
from gateway.grpcproxy.handler import peer_address
from gateway.grpcproxy.metrics import MAX_METHODS, MethodMetrics
from gateway.grpcproxy.policy import answer_metadata, client_metadata, metadata_value, refusal
from gateway.grpcproxy.tls import CertError, ClientFiles, ServerFiles
from gateway.policy import PolicyError, load_policy_text
from gateway.policy.sections import TlsClient, TlsServer
from tests.grpc.certs import CA

BASE = "version: 1\nupstream: {url: 'http://127.0.0.1:1'}\n"


def test_plaintext_only_when_the_policy_says_so() -> None:
    with pytest.raises(PolicyError, match="plaintext: true explicitly"):
        load_policy_text(BASE + "grpc: {upstream: '127.0.0.1:5000'}\n")
    with pytest.raises(PolicyError, match="plaintext: true explicitly"):
        load_policy_text(BASE + "grpc: {upstream: '127.0.0.1:5000', tls: {cert: a, key: b}}\n")
    policy = load_policy_text(BASE + "grpc: {upstream: '127.0.0.1:5000', plaintext: true}\n")
    assert policy.grpc is not None and policy.grpc.listen == "0.0.0.0:50051"
    with pytest.raises(PolicyError, match="both cert and key"):
        load_policy_text(
            BASE + "grpc: {upstream: '127.0.0.1:5000', plaintext: true,"
            " upstream_tls: {ca: c, cert: a}}\n"
        )


def test_client_metadata_drops_reserved_and_identity_keys() -> None:
    md = (
        ("x-app", "1"),
        ("x-user-id", "evil"),
        ("x_user_id", "evil"),
        ("grpc-timeout", "1S"),
        ("te", "trailers"),
        ("connection", "close"),
        ("x-request-id", "mine"),
        ("traceparent", "00-..."),
        ("x-forwarded-for", "1.2.3.4"),
        ("authorization", "Bearer t"),
        ("x-bin", b"\x00"),
    )
    out = client_metadata(md, frozenset({b"x-user-id", b"x_user_id"}))
    assert out == [("x-app", "1"), ("authorization", "Bearer t"), ("x-bin", b"\x00")]


def test_answer_metadata_keeps_the_rich_status() -> None:
    md = (("x-a", "1"), ("grpc-status-details-bin", b"\x08\x01"), ("grpc-status", "1"))
    assert answer_metadata(md) == [("x-a", "1"), ("grpc-status-details-bin", b"\x08\x01")]
    assert answer_metadata(None) == []


def test_identity_values_are_valid_metadata() -> None:
    assert metadata_value(b"alice") == "alice"
    assert metadata_value("zoë".encode()) == "zo%C3%AB"
    assert metadata_value(b"100%") == "100%25"
    assert metadata_value(b"a\nb\x00") == "a%0Ab%00"


def test_refusals_map_to_grpc_codes_with_retry_info() -> None:
    code, details, trailing = refusal(Deny(401, "missing_token", "no token"), [])
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "no token")
    assert ("x-gateway-error", "missing_token") in trailing
    deny = Deny(429, "rate_limited", "over", ((b"retry-after", b"17"),), "tier")
    code, _, trailing = refusal(deny, [(b"ratelimit-limit", b"5")])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    md = dict(trailing)
    assert md["retry-after"] == "17" and md["ratelimit-limit"] == "5"
    rich = status_pb2.Status.FromString(md["grpc-status-details-bin"])  # type: ignore[arg-type]
    info = error_details_pb2.RetryInfo()
    assert rich.code == 8 and rich.details[0].Unpack(info) and info.retry_delay.seconds == 17
    assert (
        refusal(Deny(403, "insufficient_scope", "no"), [])[0] == grpc.StatusCode.PERMISSION_DENIED
    )
    assert refusal(Deny(503, "state_unavailable", "x"), [])[0] == grpc.StatusCode.UNAVAILABLE
    assert refusal(Deny(418, "teapot", "x"), [])[0] == grpc.StatusCode.INTERNAL


def test_method_labels_are_bounded() -> None:
    m = MethodMetrics()
    assert m.labels("/pkg.v1.Svc/Do") == ("pkg.v1.Svc", "Do")
    assert m.labels("no-slash") == ("other", "other")
    assert m.labels("/a/b/c") == ("other", "other")
    for i in range(MAX_METHODS + 10):
        m.labels(f"/s.S/M{i}")
    assert m.labels("/s.S/Late") == ("other", "other")
    assert m.labels("/pkg.v1.Svc/Do") == ("pkg.v1.Svc", "Do")  # known names keep theirs


def test_peer_addresses() -> None:
    assert peer_address("ipv4:10.1.2.3:5000") == "10.1.2.3"
    assert peer_address("ipv6:[::1]:5000") == "::1"
    assert peer_address("unix:/tmp/x") == "0.0.0.0"


def test_certificate_files_are_checked(tmp_path: Path) -> None:
    ca = CA("unit-ca")
    ca_path = ca.write(tmp_path, "ca")
    cert, key = ca.issue("svc", server=True).write(tmp_path, "svc")
    _, other_key = ca.issue("other", server=True).write(tmp_path, "other")
    files = ServerFiles.load(TlsServer(cert=str(cert), key=str(key), client_ca=str(ca_path)))
    assert files.client_ca == ca.pem
    with pytest.raises(CertError, match="does not belong"):
        ServerFiles.load(TlsServer(cert=str(cert), key=str(other_key)))
    with pytest.raises(CertError, match=r"grpc\.tls\.key .*missing"):
        ServerFiles.load(TlsServer(cert=str(cert), key=str(tmp_path / "missing")))
    (tmp_path / "junk.crt").write_text("junk")
    with pytest.raises(CertError, match=r"upstream_tls\.ca: not a PEM"):
        ClientFiles.load(TlsClient(ca=str(tmp_path / "junk.crt")))


def test_the_listener_shares_its_port_only_when_asked() -> None:
    from gateway.grpcproxy.listener import server_options

    policy = load_policy_text(BASE + "grpc: {upstream: '127.0.0.1:5000', plaintext: true}\n")
    assert policy.grpc is not None
    assert ("grpc.so_reuseport", 0) in server_options(policy.grpc)
    assert ("grpc.so_reuseport", 1) in server_options(policy.grpc, reuse_port=True)
