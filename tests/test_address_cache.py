"""aiocoap's address texts (in every request's task name) are remembered, not recomputed
(gateway/coap/address_cache.py), and read exactly as aiocoap writes them."""

from __future__ import annotations

import socket
import struct

from aiocoap.transports.udp6 import UDP6EndpointAddress

from gateway.coap import address_cache


class _Interface:
    pass


def _address(host: str, port: int, local: str) -> UDP6EndpointAddress:
    flags = socket.AI_V4MAPPED
    sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, family=socket.AF_INET6, flags=flags)[0][-1]
    pktinfo = struct.pack("16sI", socket.inet_pton(socket.AF_INET6, local), socket.if_nametoindex("lo"))
    return UDP6EndpointAddress(sockaddr, _Interface(), pktinfo=pktinfo)


def test_address_texts_are_the_same_and_remembered() -> None:
    cases = [("127.0.0.1", 40000, "::ffff:127.0.0.1"), ("::1", 5683, "::1")]
    before = []
    for host, port, local in cases:
        address = _address(host, port, local)
        before.append((repr(address), address.hostinfo))
    assert before[0] == ("<UDP6EndpointAddress 127.0.0.1:40000 (locally 127.0.0.1%lo)>", "127.0.0.1:40000")
    address_cache.install()
    address_cache.install()  # once only
    after = []
    for host, port, local in cases:
        address = _address(host, port, local)
        after.append((repr(address), address.hostinfo))
        after.append((repr(address), address.hostinfo))
    assert after[::2] == before and after[1::2] == before
    strip = UDP6EndpointAddress._strip_v4mapped
    assert strip.cache_info().hits >= 2  # type: ignore[attr-defined]
