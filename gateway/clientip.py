"""The client's address: the socket peer, or X-Forwarded-For when the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIpResolver:
    """Resolves the client address from the peer and ``X-Forwarded-For``.

    The peer is believed only when it is in ``trusted``; then the chain is read from the right
    and the first address that is not a trusted proxy is the client, so a client cannot choose
    its own address by sending an ``X-Forwarded-For`` of its own.
    """

    __slots__ = ("_trusted",)

    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in trusted
        )

    @property
    def enabled(self) -> bool:
        """True when some proxies are trusted (otherwise the peer is always the client)."""
        return bool(self._trusted)

    def is_trusted(self, addr: str) -> bool:
        """True when ``addr`` is inside one of the trusted ranges."""
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def resolve(self, peer: str, xff: list[bytes]) -> str:
        """The client address for a request from ``peer`` carrying these XFF header values."""
        if not self._trusted or not xff or not self.is_trusted(peer):
            return peer
        hops = [h.strip() for v in xff for h in v.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not hop:
                continue
            try:
                addr = str(ipaddress.ip_address(hop))
            except ValueError:
                # Garbage in the chain: the last hop we could trust is the best we know.
                return peer
            if not self.is_trusted(addr):
                return addr
            peer = addr
        return peer
