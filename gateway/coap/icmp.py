"""ICMP errors attributed to the peer that caused them, not to the next one sent to.

aiocoap 0.4.17 turns on IP_RECVERR on its UDP socket, so an ICMP error (a device's
port closed, its NAT mapping gone) arrives twice: once on the error queue with the
address it was about, which aiocoap reads and attributes correctly, and once as the
socket's pending error, which Linux hands to whichever ``sendmsg`` comes next. aiocoap
blames that pending error on the peer of that next send: it drops the datagram,
forgets its exchange and ends its observations, so one vanished device could cost an
unrelated watcher its notification and its subscription (measured: a CON notification
to a live watcher lost after a gone watcher's notification refused by ICMP).

An unconnected UDP socket cannot learn at send time that *this* destination is
unreachable, so an ICMP-class error from ``sendmsg`` is always stale: it is dropped
(the error queue reports it, correctly addressed) and the datagram is sent again.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

# What ICMP destination-unreachable and friends become as a socket's pending error.
# (EMSGSIZE is left out: that one is about the datagram being sent.)
STALE_ICMP_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EPROTO}
)
# Each failed attempt consumes one pending error; more than a few in a row means a
# storm of ICMP, and the CON retransmission (or the next NON) will carry on.
SEND_ATTEMPTS = 4


class StaleErrorSafeSend:
    """Replaces a recvmsg datagram transport's ``sendmsg``: a stale ICMP error met on
    sending is retried once rather than blamed on this datagram's peer."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.sock: socket.socket = transport.get_extra_info("socket")
        self.original = transport.sendmsg
        self.stale_errors = 0

    def __call__(self, data: bytes, ancdata: list[Any], flags: int, address: Any) -> None:
        for _attempt in range(SEND_ATTEMPTS):
            try:
                self.sock.sendmsg((data,), ancdata, flags, address)
                return
            except OSError as exc:
                if exc.errno not in STALE_ICMP_ERRNOS:
                    # Not ours to judge (buffer full, bad address): aiocoap's handling.
                    self.transport._protocol.error_received(exc)
                    return
                self.stale_errors += 1
                log.debug("stale ICMP error %s met sending to %r; sending again", exc, address)
        # Blame nobody: the errors were about other peers.


def install(transport: Any) -> StaleErrorSafeSend:
    safe = StaleErrorSafeSend(transport)
    transport.sendmsg = safe
    return safe
