"""Fixtures of the gRPC tests: stubs from ``echo.proto``, certificates, the Echo service and
gateways with a ``grpc`` section, all real processes over TCP."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from tests.grpc.certs import CA
from tests.grpc.stubs import load
from tests.procs import Gateway, MockLLM, Proc, free_port, wait_tcp


@dataclass(frozen=True)
class Stubs:
    """The generated modules and where they are."""

    pb2: ModuleType
    grpc: ModuleType
    directory: Path


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    """``echo_pb2`` and ``echo_pb2_grpc``, generated once per session."""
    directory = tmp_path_factory.mktemp("stubs")
    pb2, pb2_grpc = load(directory)
    return Stubs(pb2, pb2_grpc, directory)


@dataclass(frozen=True)
class Pki:
    """Certificate files: one CA for everything in the pod, and an unrelated one."""

    directory: Path
    ca: CA
    other: CA

    def path(self, name: str) -> str:
        """Path of a written file."""
        return str(self.directory / name)

    def read(self, name: str) -> bytes:
        """Bytes of a written file."""
        return (self.directory / name).read_bytes()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """``ca.crt``, ``service.*`` (the Echo service), ``gateway.*`` (the listener),
    ``gateway-client.*`` (the gateway towards the service), ``client.*`` (a caller), and
    ``other-ca.crt``/``intruder.*`` (a caller from another CA)."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other = CA("pod-ca"), CA("other-ca")
    ca.write(directory, "ca")
    other.write(directory, "other-ca")
    ca.issue("echo-service", server=True).write(directory, "service")
    ca.issue("gateway", server=True).write(directory, "gateway")
    ca.issue("gateway-client", server=False).write(directory, "gateway-client")
    ca.issue("caller", server=False).write(directory, "client")
    other.issue("intruder", server=False).write(directory, "intruder")
    return Pki(directory, ca, other)


class EchoService(Proc):
    """``python -m tests.grpc.service`` on a free port (TLS when ``tls`` names the files)."""

    def __init__(self, stubs: Stubs, log: Path, tls: list[str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "tests.grpc.service", "--port", str(self.port)]
        args += ["--stubs", str(stubs.directory), *(tls or [])]
        self.args = args
        super().__init__(args, log)
        wait_tcp(self.port, proc=self.popen)

    def restart(self) -> None:
        """Start the service again on the same port (after ``stop``), logging to a new file."""
        super().__init__(self.args, self.log_path.with_suffix(".again.log"))
        wait_tcp(self.port, proc=self.popen)


@pytest.fixture
def echo(stubs: Stubs, tmp_path: Path) -> Iterator[EchoService]:
    """A plaintext Echo service for one test."""
    svc = EchoService(stubs, tmp_path / "echo.log")
    yield svc
    svc.stop()


@pytest.fixture
def echo_mtls(stubs: Stubs, pki: Pki, tmp_path: Path) -> Iterator[EchoService]:
    """An Echo service that requires client certificates from the pod CA."""
    tls = ["--cert", pki.path("service.crt"), "--key", pki.path("service.key")]
    svc = EchoService(stubs, tmp_path / "echo.log", [*tls, "--ca", pki.path("ca.crt")])
    yield svc
    svc.stop()


class GrpcGateway(Gateway):
    """A gateway process with a gRPC listener on ``grpc_port``."""

    grpc_port: int

    @property
    def grpc_address(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC listener."""
        return f"127.0.0.1:{self.grpc_port}"


StartGrpcGateway = Callable[..., GrpcGateway]


@pytest.fixture
def start_grpc_gateway(tmp_path: Path, mock_llm: MockLLM) -> Iterator[StartGrpcGateway]:
    """Start a gateway from YAML text: ``{grpc_port}``, ``{upstream}`` (the Echo service's
    address) and ``{http_upstream}`` (the mock LLM, so readiness passes) are substituted."""
    started: list[GrpcGateway] = []

    def start(
        policy_yaml: str,
        upstream: str,
        env: dict[str, str] | None = None,
        http_upstream: str | None = None,
    ) -> GrpcGateway:
        port = free_port()
        path = tmp_path / f"policy-{len(started)}.yaml"
        text = policy_yaml.replace("{grpc_port}", str(port)).replace("{upstream}", upstream)
        path.write_text(text.replace("{http_upstream}", http_upstream or mock_llm.url))
        gw = GrpcGateway.__new__(GrpcGateway)
        gw.grpc_port = port
        Gateway.__init__(gw, path, tmp_path / f"gateway-{len(started)}.log", env)
        started.append(gw)
        try:
            wait_tcp(port, proc=gw.popen)
        except Exception as exc:
            raise RuntimeError(f"gRPC listener did not open: {exc}\n{gw.log()}") from None
        return gw

    yield start
    for gw in started:
        gw.stop()
    for gw in started:  # a call the gateway failed to handle would show here
        text = gw.log_path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if '"level": "error"' in line]
        assert errors == [], f"the gateway logged errors:\n{errors[:3]}"


def plaintext_policy(extra: str = "", grpc_extra: str = "") -> str:
    """A policy with a plaintext gRPC listener (``extra`` at top level, ``grpc_extra`` in
    the ``grpc`` section, both YAML lines)."""
    return (
        "version: 1\n"
        'upstream: {url: "{http_upstream}"}\n'
        "grpc:\n"
        "  listen: 127.0.0.1:{grpc_port}\n"
        "  upstream: {upstream}\n"
        "  plaintext: true\n" + grpc_extra + extra
    )


def channel(address: str) -> grpc.Channel:
    """A plaintext client channel."""
    return grpc.insecure_channel(address)


def handled(gw: Gateway, method: str, code: str, service: str = "echo.Echo") -> float:
    """``grpc_server_handled_total`` of one method and code (labels in exposition order)."""
    labels = {"grpc_code": code, "grpc_method": method, "grpc_service": service}
    return gw.metric("grpc_server_handled_total", labels)
