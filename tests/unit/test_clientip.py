"""Client address resolution with trusted proxies."""

from __future__ import annotations

from gateway.clientip import ClientIpResolver


def test_untrusted_peer_ignores_xff() -> None:
    r = ClientIpResolver(["10.0.0.0/8"])
    assert r.resolve("203.0.113.9", [b"1.2.3.4"]) == "203.0.113.9"


def test_no_trusted_proxies_means_peer() -> None:
    assert ClientIpResolver([]).resolve("127.0.0.1", [b"1.2.3.4"]) == "127.0.0.1"


def test_rightmost_untrusted_hop() -> None:
    r = ClientIpResolver(["10.0.0.0/8"])
    # the client wrote "6.6.6.6" itself; the trusted proxy appended the real address
    assert r.resolve("10.0.0.2", [b"6.6.6.6, 198.51.100.7, 10.0.0.5"]) == "198.51.100.7"
    assert r.resolve("10.0.0.2", [b"6.6.6.6", b"198.51.100.7"]) == "198.51.100.7"


def test_all_trusted_and_garbage() -> None:
    r = ClientIpResolver(["10.0.0.0/8", "::1/128"])
    assert r.resolve("10.0.0.2", [b"10.0.0.3"]) == "10.0.0.3"
    assert r.resolve("10.0.0.2", [b"1.2.3.4, not-an-ip"]) == "10.0.0.2"
    assert r.resolve("::1", [b"2001:db8::1"]) == "2001:db8::1"
