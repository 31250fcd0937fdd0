"""Mutual TLS on both sides of the gateway, refusals at the handshake, certificate rotation."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.grpc.certs import CA
from tests.grpc.conftest import (
    EchoService,
    GrpcGateway,
    Pki,
    StartGrpcGateway,
    Stubs,
    handled,
)

SECRET_FILES = ("ca.crt", "gateway.crt", "gateway.key", "gateway-client.crt", "gateway-client.key")


def mtls_policy(files: Callable[[str], str], interval: str = "5s") -> str:
    """Inbound mTLS (pod CA) and outbound mTLS with the gateway's client certificate."""
    return (
        "version: 1\n"
        'upstream: {url: "{http_upstream}"}\n'
        "grpc:\n"
        "  listen: 127.0.0.1:{grpc_port}\n"
        "  upstream: {upstream}\n"
        f"  tls_reload_interval: {interval}\n"
        "  tls:\n"
        f"    cert: {files('gateway.crt')}\n"
        f"    key: {files('gateway.key')}\n"
        f"    client_ca: {files('ca.crt')}\n"
        "  upstream_tls:\n"
        f"    ca: {files('ca.crt')}\n"
        f"    cert: {files('gateway-client.crt')}\n"
        f"    key: {files('gateway-client.key')}\n"
    )


def client(
    gw: GrpcGateway, pki: Pki, name: str | None = "client", ca: str = "ca.crt"
) -> grpc.Channel:
    """A TLS channel to the gateway that trusts ``ca`` and presents ``name``'s certificate;
    its own connections, so each channel makes a new handshake."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.read(ca),
        private_key=pki.read(f"{name}.key") if name else None,
        certificate_chain=pki.read(f"{name}.crt") if name else None,
    )
    return grpc.secure_channel(
        gw.grpc_address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
    )


def refused(ch: grpc.Channel, stubs: Stubs) -> grpc.StatusCode:
    """The code of a call that must fail (at the handshake)."""
    with ch, pytest.raises(grpc.RpcError) as info:
        stubs.grpc.EchoStub(ch).Unary(stubs.pb2.Msg(text="x"), timeout=5)
    code: grpc.StatusCode = info.value.code()  # type: ignore[attr-defined]
    return code


def test_mtls_both_ways(
    start_grpc_gateway: StartGrpcGateway, echo_mtls: EchoService, pki: Pki, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(mtls_policy(pki.path), echo_mtls.address)
    with client(gw, pki) as ch:
        reply = stubs.grpc.EchoStub(ch).Unary(stubs.pb2.Msg(text="secure"), timeout=5)
    assert reply.text == "secure"
    assert reply.peer_cn == "gateway-client"  # the service saw the gateway's certificate
    assert handled(gw, "Unary", "OK") == 1


def test_clients_without_a_valid_certificate_are_refused_at_the_handshake(
    start_grpc_gateway: StartGrpcGateway, echo_mtls: EchoService, pki: Pki, stubs: Stubs
) -> None:
    gw = start_grpc_gateway(mtls_policy(pki.path), echo_mtls.address)
    assert refused(client(gw, pki, name=None), stubs) == grpc.StatusCode.UNAVAILABLE
    assert refused(client(gw, pki, name="intruder"), stubs) == grpc.StatusCode.UNAVAILABLE
    assert refused(grpc.insecure_channel(gw.grpc_address), stubs) == grpc.StatusCode.UNAVAILABLE
    # None of them got as far as a call.
    assert handled(gw, "Unary", "OK") == 0 and handled(gw, "Unary", "UNAVAILABLE") == 0
    with client(gw, pki) as ch:
        assert stubs.grpc.EchoStub(ch).Unary(stubs.pb2.Msg(text="ok"), timeout=5).text == "ok"


def test_upstream_must_present_a_certificate_from_the_ca(
    start_grpc_gateway: StartGrpcGateway, stubs: Stubs, pki: Pki, tmp_path: Path
) -> None:
    """An upstream whose certificate is from another CA is not talked to."""
    fake = pki.other.issue("echo-service", server=True)
    cert, key = fake.write(tmp_path, "fake-service")
    svc = EchoService(stubs, tmp_path / "fake.log", ["--cert", str(cert), "--key", str(key)])
    try:
        gw = start_grpc_gateway(mtls_policy(pki.path), svc.address)
        with client(gw, pki) as ch, pytest.raises(grpc.RpcError) as info:
            stubs.grpc.EchoStub(ch).Unary(stubs.pb2.Msg(text="x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert info.value.details() == "the upstream is unavailable"  # type: ignore[attr-defined]
    finally:
        svc.stop()


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the time")
        time.sleep(0.1)


def test_certificates_are_reloaded_when_the_files_change(
    start_grpc_gateway: StartGrpcGateway,
    echo_mtls: EchoService,
    pki: Pki,
    stubs: Stubs,
    tmp_path: Path,
) -> None:
    """A secret rotation: the listener's certificate (now from a new CA) and the gateway's
    client certificate are rewritten; new handshakes use the new ones."""
    files = tmp_path / "secret"
    files.mkdir()
    for name in (
        "ca.crt",
        "gateway.crt",
        "gateway.key",
        "gateway-client.crt",
        "gateway-client.key",
    ):
        shutil.copy(pki.directory / name, files / name)
    gw = start_grpc_gateway(
        mtls_policy(lambda n: str(files / n), interval="200ms"), echo_mtls.address
    )
    pb2 = stubs.pb2
    old = client(gw, pki)  # connected before the rotation: keeps working
    assert stubs.grpc.EchoStub(old).Unary(pb2.Msg(text="a"), timeout=5).peer_cn == "gateway-client"

    rotated = CA("rotated-ca")
    rotated_dir = tmp_path / "rotated"
    rotated.write(rotated_dir, "rotated-ca")
    rotated.issue("gateway", server=True).write(files, "gateway")
    pki.ca.issue("gateway-client-2", server=False).write(files, "gateway-client")

    def new_handshake_uses_new_cert() -> bool:
        creds = grpc.ssl_channel_credentials(
            root_certificates=rotated.pem,
            private_key=pki.read("client.key"),
            certificate_chain=pki.read("client.crt"),
        )
        opts = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(gw.grpc_address, creds, options=opts) as ch:
            try:
                reply = stubs.grpc.EchoStub(ch).Unary(pb2.Msg(text="b"), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.peer_cn == "gateway-client-2")

    _eventually(new_handshake_uses_new_cert)
    # A client that trusts only the old CA cannot connect anew.
    assert refused(client(gw, pki), stubs) == grpc.StatusCode.UNAVAILABLE
    # The connection made before the rotation still works.
    assert stubs.grpc.EchoStub(old).Unary(pb2.Msg(text="c"), timeout=5).text == "c"
    old.close()
    log = gw.log()
    assert "listener certificates reloaded" in log and "upstream certificates reloaded" in log


def test_a_half_written_rotation_keeps_the_old_certificates(
    start_grpc_gateway: StartGrpcGateway,
    echo_mtls: EchoService,
    pki: Pki,
    stubs: Stubs,
    tmp_path: Path,
) -> None:
    files = tmp_path / "secret"
    files.mkdir()
    for name in (
        "ca.crt",
        "gateway.crt",
        "gateway.key",
        "gateway-client.crt",
        "gateway-client.key",
    ):
        shutil.copy(pki.directory / name, files / name)
    gw = start_grpc_gateway(
        mtls_policy(lambda n: str(files / n), interval="100ms"), echo_mtls.address
    )
    # A new certificate whose key has not been written yet: it does not fit the old key.
    (files / "gateway.crt").write_bytes(pki.ca.issue("gateway", server=True).cert)
    (files / "gateway-client.key").write_bytes(b"not a key")
    _eventually(lambda: "not usable yet" in gw.log())
    time.sleep(0.3)
    with client(gw, pki) as ch:
        reply = stubs.grpc.EchoStub(ch).Unary(stubs.pb2.Msg(text="still"), timeout=5)
    assert (reply.text, reply.peer_cn) == ("still", "gateway-client")


def test_gateway_refuses_to_start_with_unusable_certificates(pki: Pki, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.procs import ROOT, free_port

    policy = tmp_path / "policy.yaml"
    text = mtls_policy(pki.path).replace("{http_upstream}", "http://127.0.0.1:9")
    text = text.replace("{grpc_port}", str(free_port())).replace("{upstream}", "127.0.0.1:9")
    policy.write_text(text.replace(pki.path("gateway.key"), pki.path("client.key")))
    ports = ["--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(policy), *ports],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "grpc.tls: the key does not belong to the certificate" in done.stderr + done.stdout
    assert "BEGIN" not in done.stderr + done.stdout  # no key material in the message
