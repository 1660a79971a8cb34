"""Counting relays: every byte a client and a server exchange passes through one of these.

Theory of operation
===================

A :class:`Meter` holds one list of :class:`Record` s, one per ``recv()`` on a relay
socket: which *leg* (a client's link to its server, e.g. ``"alice"``), which
direction (``"up"`` = client -> server, ``"down"`` = server -> client), how many
bytes, and which *phase* of the scenario was current. Phases are switched by the
scenario only after :meth:`Meter.settle` has seen the links quiet, so a late
notification or ACK is booked to the operation that caused it.

:class:`UdpRelay` forwards datagrams between one client socket and one server
(one upstream socket per relay, so the server sees one source port per client).
A UDP record is exactly one datagram: its size is the UDP payload as it was on
the socket. :class:`TcpRelay` accepts TCP connections and opens one upstream
connection for each; a TCP record is one ``recv()`` chunk, i.e. application
payload bytes (TLS records included, when the client speaks TLS): what the
kernel delivered in one read. The number of chunks stands in for the number of
data-carrying TCP segments when headers are estimated (:func:`tcp_header_estimate`).

Both relays bind 127.0.0.1 only. They never look into what they forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

IPV4_UDP_HEADERS = 28  # RFC 791 20 B + RFC 768 8 B
IPV4_TCP_HEADERS = 52  # RFC 791 20 B + RFC 9293 20 B + 12 B timestamps option (Linux default, RFC 7323)


@dataclass(frozen=True, slots=True)
class Record:
    phase: str
    leg: str
    direction: str  # "up" (client -> server) or "down" (server -> client)
    size: int
    transport: str  # "udp" or "tcp"
    data: bytes = b""  # kept for UDP datagrams only (small; used to label CoAP messages)


@dataclass
class Meter:
    phase: str = "idle"
    records: list[Record] = field(default_factory=list)
    last_activity: float = field(default_factory=time.monotonic)

    def add(self, leg: str, direction: str, data: bytes, transport: str) -> None:
        keep = data if transport == "udp" else b""
        self.records.append(Record(self.phase, leg, direction, len(data), transport, keep))
        self.last_activity = time.monotonic()

    async def settle(self, idle: float = 0.15, timeout: float = 5.0) -> None:
        """Wait until no byte moved on any relay for ``idle`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_activity < idle and time.monotonic() < deadline:
            await asyncio.sleep(idle / 3)

    def settle_blocking(self, idle: float = 0.15, timeout: float = 5.0) -> None:
        """:meth:`settle` for code running in another thread (paho-mqtt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_activity < idle and time.monotonic() < deadline:
            time.sleep(idle / 3)

    def of(self, phase: str, legs: Iterable[str] | None = None) -> list[Record]:
        wanted = None if legs is None else set(legs)
        return [r for r in self.records if r.phase == phase and (wanted is None or r.leg in wanted)]


def summarise(records: list[Record]) -> dict[str, Any]:
    """Payload bytes per direction, plus an estimate with IPv4 and UDP/TCP headers."""
    up = sum(r.size for r in records if r.direction == "up")
    down = sum(r.size for r in records if r.direction == "down")
    udp = [r for r in records if r.transport == "udp"]
    tcp = [r for r in records if r.transport == "tcp"]
    headers = IPV4_UDP_HEADERS * len(udp) + IPV4_TCP_HEADERS * len(tcp)
    return {
        "bytes": up + down,
        "up": up,
        "down": down,
        "units": len(records),  # datagrams (UDP) or recv() chunks (TCP)
        "bytes_with_headers": up + down + headers,
        "messages": [f"{r.leg}:{r.direction}:{r.size}" for r in records],
    }


def tcp_header_estimate(chunks: int) -> int:
    """IPv4+TCP header bytes for ``chunks`` data segments; pure ACKs are not counted,
    so the estimate is a lower bound."""
    return IPV4_TCP_HEADERS * chunks


class _ClientSide(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay._from_client(data, (addr[0], addr[1]))


class _ServerSide(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.relay._from_server(data)


class UdpRelay:
    """client <-> relay <-> server for one leg. ``initiator_is_server`` swaps the
    direction labels, for a relay whose initiating side is the server (a SIP server
    sending a NOTIFY to a user agent)."""

    def __init__(self, meter: Meter, leg: str, server: tuple[str, int], *, initiator_is_server: bool = False) -> None:
        self.meter = meter
        self.leg = leg
        self.server = server
        self._from_initiator = "down" if initiator_is_server else "up"
        self._to_initiator = "up" if initiator_is_server else "down"
        self._client_addr: tuple[str, int] | None = None
        self._listen: asyncio.DatagramTransport | None = None
        self._upstream: asyncio.DatagramTransport | None = None

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._listen, _ = await loop.create_datagram_endpoint(lambda: _ClientSide(self), local_addr=("127.0.0.1", 0))
        self._upstream, _ = await loop.create_datagram_endpoint(
            lambda: _ServerSide(self), local_addr=("127.0.0.1", 0), remote_addr=self.server
        )
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._listen is not None
        host, port = self._listen.get_extra_info("sockname")[:2]
        return host, port

    @property
    def upstream_port(self) -> int:
        """The source port the server sees for this leg's client."""
        assert self._upstream is not None
        return int(self._upstream.get_extra_info("sockname")[1])

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        self._client_addr = addr
        self.meter.add(self.leg, self._from_initiator, data, "udp")
        assert self._upstream is not None
        self._upstream.sendto(data)

    def _from_server(self, data: bytes) -> None:
        self.meter.add(self.leg, self._to_initiator, data, "udp")
        if self._client_addr is not None and self._listen is not None:
            self._listen.sendto(data, self._client_addr)

    def close(self) -> None:
        for transport in (self._listen, self._upstream):
            if transport is not None:
                transport.close()


class TcpRelay:
    """Accepts on 127.0.0.1:0 and pipes each connection to ``server``, counting chunks."""

    def __init__(self, meter: Meter, leg: str, server: tuple[str, int]) -> None:
        self.meter = meter
        self.leg = leg
        self.server = server
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.server)
        self._writers += [writer, up_writer]
        tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, "up")),
            asyncio.create_task(self._pipe(up_reader, writer, "down")),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while chunk := await reader.read(65536):
                self.meter.add(self.leg, direction, chunk, "tcp")
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
