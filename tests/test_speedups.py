"""The gateway's speed-ups of aiocoap (gateway/coap/speedups.py) change nothing but the
speed: address texts read exactly as aiocoap writes them, and a copied message's
options are equal to the original's and independent of them."""

from __future__ import annotations

import copy
import socket
import struct

from aiocoap import Code, Message
from aiocoap.numbers import ContentFormat
from aiocoap.transports.udp6 import UDP6EndpointAddress

from gateway.coap import speedups
from gateway.coap.site import with_path


class _Interface:
    pass


_INTERFACE = _Interface()  # addresses hold it weakly


def _address(host: str, port: int, local: str) -> UDP6EndpointAddress:
    flags = socket.AI_V4MAPPED
    sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, family=socket.AF_INET6, flags=flags)[0][-1]
    pktinfo = struct.pack("16sI", socket.inet_pton(socket.AF_INET6, local), socket.if_nametoindex("lo"))
    return UDP6EndpointAddress(sockaddr, _INTERFACE, pktinfo=pktinfo)


def test_address_texts_are_the_same_and_remembered() -> None:
    cases = [("127.0.0.1", 40000, "::ffff:127.0.0.1"), ("::1", 5683, "::1")]
    before = []
    for host, port, local in cases:
        address = _address(host, port, local)
        before.append((repr(address), address.hostinfo))
    assert before[0] == ("<UDP6EndpointAddress 127.0.0.1:40000 (locally 127.0.0.1%lo)>", "127.0.0.1:40000")
    speedups.install()
    speedups.install()  # once only
    after = []
    for host, port, local in cases:
        address = _address(host, port, local)
        after.append((repr(address), address.hostinfo))
        after.append((repr(address), address.hostinfo))
        assert address.is_multicast_locally is False and address.as_response_address() is address
    assert after[::2] == before and after[1::2] == before
    multicast = _address("127.0.0.1", 40000, "ff02::fd")
    assert multicast.is_multicast_locally is True and multicast.as_response_address().pktinfo is None
    strip = UDP6EndpointAddress._strip_v4mapped
    assert strip.cache_info().hits >= 2  # type: ignore[attr-defined]


def test_copied_options_are_equal_and_independent() -> None:
    speedups.install()
    original = Message(code=Code.CONTENT, payload=b"x", content_format=ContentFormat.CBOR, etag=b"\x01\x02", max_age=7)
    original.opt.uri_path = ("i", "bob@example.org")
    copied = original.copy(max_age=0)
    assert copied.opt.content_format == ContentFormat.CBOR and copied.opt.etag == b"\x01\x02"
    assert copied.opt.uri_path == ("i", "bob@example.org") and copied.opt.max_age == 0
    assert original.opt.max_age == 7  # the copy's change did not reach the original
    copied.opt.uri_path = ("p",)
    copied.opt.etag = None
    assert original.opt.uri_path == ("i", "bob@example.org") and original.opt.etag == b"\x01\x02"
    assert copy.deepcopy(original.opt) == original.opt
    original.mtype, original.mid = 0, 1  # CON: only to encode it
    assert Message.decode(original.encode()).opt == original.opt


def test_a_routed_request_keeps_its_uri_and_options() -> None:
    request = Message(code=Code.POST, uri="coap://gw.example/i/bob@example.org?a", payload=b"\x82\x01\x41x")
    routed = with_path(request, ("bob@example.org",))
    assert routed.opt.uri_path == ("bob@example.org",) and routed.opt.uri_query == ("a",)
    assert request.opt.uri_path == ("i", "bob@example.org")
    assert routed.get_request_uri() == request.get_request_uri() == "coap://gw.example/i/bob@example.org?a"
    assert (routed.code, routed.payload, routed.token) == (request.code, request.payload, request.token)
