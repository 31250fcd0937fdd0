"""Annotated field types shared by the policy schema: durations, sizes, rates, secrets."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from gateway.units import parse_duration, parse_rate, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written ``250ms``, ``2s``, ``1m``, ``1h`` or ``1d``."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, written ``512KiB``, ``1MiB`` or a plain byte count."""

Rate = Annotated[str, BeforeValidator(parse_rate)]
"""A rate in the ``limits`` notation: ``20/minute`` or several windows ``10/second;500/hour``."""


def _parse_hostport(value: object) -> str:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return value
    raise ValueError(f"{value!r} is not an address (use HOST:PORT, e.g. 0.0.0.0:8080)")


HostPort = Annotated[str, BeforeValidator(_parse_hostport)]
"""A listen or connect address ``HOST:PORT``."""


def _parse_cidr(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR range") from None


Cidr = Annotated[str, BeforeValidator(_parse_cidr)]
"""An IP address or CIDR range such as ``10.0.0.0/8``."""


def split_hostport(value: str) -> tuple[str, int]:
    """Split a validated ``HOST:PORT`` (IPv6 hosts may be bracketed)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class SecretRef(BaseModel):
    """A secret kept out of the policy file: ``{env: NAME}`` or ``{file: PATH}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    env: str | None = None
    """Name of the environment variable that holds the secret."""
    file: str | None = None
    """Path of a file that holds the secret (e.g. a mounted Kubernetes Secret); trailing
    newlines are stripped."""

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: object) -> object:
        if not isinstance(data, dict):
            raise ValueError("secrets are never written inline: use {env: NAME} or {file: PATH}")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of {env: NAME} or {file: PATH}")
        return self

    def resolve(self) -> bytes:
        """Read the secret now; raises ``ValueError`` naming the source, never the value."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ValueError(f"environment variable {self.env} is not set or empty")
            return value.encode()
        assert self.file is not None
        try:
            data = Path(self.file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read secret file {self.file}: {exc.strerror}") from None
        if not data:
            raise ValueError(f"secret file {self.file} is empty")
        return data
