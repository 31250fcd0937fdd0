"""Certificates of the gRPC listener and of the upstream channel, re-read when they change.

Kubernetes rotates a mounted secret by swapping a symlink; the files are checked by ``stat``
(device, inode, mtime, size of the resolved path) at most once per ``tls_reload_interval``.
A new set is used only once it loads and its key matches its certificate, so a half-written
rotation keeps the previous certificates instead of breaking every new handshake.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.policy.sections import TlsClient, TlsServer

log = logging.getLogger("gateway.grpc.tls")

Fingerprint = tuple[tuple[int, int, int, int] | None, ...]


def fingerprint(paths: tuple[str, ...]) -> Fingerprint:
    """What ``stat`` says about each file (None for a missing one)."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks: a secret swap changes the target inode
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class CertError(ValueError):
    """A certificate file is missing, unreadable or does not fit its key."""


def read_pem(path: str, what: str) -> bytes:
    """The file's bytes; CertError naming ``what`` when it cannot be read."""
    try:
        return open(path, "rb").read()
    except OSError as exc:
        raise CertError(f"{what} {path}: {exc.strerror or exc}") from None


def check_pair(cert_pem: bytes, key_pem: bytes, what: str) -> None:
    """CertError unless ``key_pem`` is the private key of the first certificate of the chain."""
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, IndexError) as exc:
        raise CertError(f"{what}: not a PEM certificate and unencrypted key ({exc})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, public) != key.public_key().public_bytes(enc, public):
        raise CertError(f"{what}: the key does not belong to the certificate")


def check_ca(ca_pem: bytes, what: str) -> None:
    """CertError unless ``ca_pem`` holds at least one PEM certificate."""
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise CertError(f"{what}: not a PEM certificate ({exc})") from None


@dataclass(frozen=True)
class ServerFiles:
    """One loaded set of listener certificates."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def load(cls, cfg: TlsServer) -> ServerFiles:
        """Read and check the files named by ``cfg``."""
        cert = read_pem(cfg.cert, "grpc.tls.cert")
        key = read_pem(cfg.key, "grpc.tls.key")
        check_pair(cert, key, "grpc.tls")
        ca = read_pem(cfg.client_ca, "grpc.tls.client_ca") if cfg.client_ca else None
        if ca is not None:
            check_ca(ca, "grpc.tls.client_ca")
        return cls(cert, key, ca)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """grpcio's certificate configuration for these files."""
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class ServerCredentials:
    """Listener credentials whose certificates follow the files on disk.

    grpcio calls the fetcher at the start of each new handshake, on its own threads: it
    returns None while nothing changed (so a handshake costs one clock read), or the new
    configuration once the files changed and load cleanly.
    """

    def __init__(self, cfg: TlsServer, interval: float) -> None:
        self.cfg = cfg
        self.interval = interval
        self.paths = tuple(p for p in (cfg.cert, cfg.key, cfg.client_ca) if p)
        self._seen = fingerprint(self.paths)
        self.files = ServerFiles.load(cfg)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self.reloads = 0

    def credentials(self) -> grpc.ServerCredentials:
        """The credentials to give ``add_secure_port``."""
        return grpc.dynamic_ssl_server_credentials(
            self.files.configuration(),
            # grpcio takes None as "unchanged", which its type stubs do not say
            cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch),
            require_client_authentication=self.cfg.client_ca is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        now = time.monotonic()
        if now - self._checked < self.interval or not self._lock.acquire(blocking=False):
            return None
        try:
            self._checked = now
            seen = fingerprint(self.paths)
            if seen == self._seen:
                return None
            try:
                files = ServerFiles.load(self.cfg)
            except CertError as exc:
                # Retried at the next interval: the rotation may be half written.
                log.warning("new listener certificates not usable yet: %s", exc)
                return None
            self._seen = seen
            if files == self.files:
                return None
            self.files = files
            self.reloads += 1
            log.info("listener certificates reloaded", extra={"paths": list(self.paths)})
            return files.configuration()
        except Exception:
            log.exception("checking the listener certificates failed")
            return None
        finally:
            self._lock.release()


@dataclass(frozen=True)
class ClientFiles:
    """One loaded set of upstream (client side) certificates."""

    ca: bytes
    cert: bytes | None
    key: bytes | None

    @classmethod
    def load(cls, cfg: TlsClient) -> ClientFiles:
        """Read and check the files named by ``cfg``."""
        ca = read_pem(cfg.ca, "grpc.upstream_tls.ca")
        check_ca(ca, "grpc.upstream_tls.ca")
        cert = key = None
        if cfg.cert and cfg.key:
            cert = read_pem(cfg.cert, "grpc.upstream_tls.cert")
            key = read_pem(cfg.key, "grpc.upstream_tls.key")
            check_pair(cert, key, "grpc.upstream_tls")
        return cls(ca, cert, key)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials for these files."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def client_paths(cfg: TlsClient) -> tuple[str, ...]:
    """The files the upstream channel depends on."""
    return tuple(p for p in (cfg.ca, cfg.cert, cfg.key) if p)
