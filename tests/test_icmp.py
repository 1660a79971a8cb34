"""A vanished device's ICMP error must not cost anyone else a datagram or a subscription.

Linux hands an ICMP error on an unconnected UDP socket to the next ``sendmsg`` as well
as to the error queue; aiocoap 0.4.17 blames it on that next send's peer (see
gateway/coap/icmp.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message

from device_sim.client import DeviceClient
from gateway.app import Gateway
from gateway.core import codec
from gateway.core.model import PresenceDocument, Status

from .conftest import ALICE, BOB, keystore_of
from .rawcoap import RawDevice

MakeDevice = Callable[..., Awaitable[DeviceClient]]


def _sockaddr(family: int, port: int) -> Any:
    return ("::ffff:127.0.0.1", port, 0, 0) if family == socket.AF_INET6 else ("127.0.0.1", port)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        return int(gone.getsockname()[1])


async def test_a_stale_icmp_error_does_not_drop_the_next_datagram(gateway: Gateway) -> None:
    guard = gateway.send_guard
    assert guard is not None
    family = guard.sock.family
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as live:
        live.bind(("127.0.0.1", 0))
        live.setblocking(False)
        live_addr = _sockaddr(family, live.getsockname()[1])

        # Unguarded (aiocoap's own sendmsg): the refusal of the first datagram comes
        # back as the second send's error, and the second datagram is never sent.
        guard.original(b"to the gone one", [], 0, _sockaddr(family, _closed_port()))
        guard.original(b"lost", [], 0, live_addr)
        await asyncio.sleep(0.05)
        assert _drain(live) == []

        guard(b"to the gone one", [], 0, _sockaddr(family, _closed_port()))
        guard(b"delivered", [], 0, live_addr)
        await asyncio.sleep(0.05)
        assert _drain(live) == [b"delivered"]
        assert guard.stale_errors >= 1


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


async def test_a_vanished_watcher_does_not_cost_a_live_watcher_its_notification(
    gateway: Gateway, device: MakeDevice, tmp_path: Path
) -> None:
    """Each round one watcher observes and vanishes (socket closed: ICMP port unreachable
    for its notification) and another, which subscribed after it, stays. The one that
    stays gets its notification at once, not after a retransmission (ACK_TIMEOUT >= 2 s)."""
    alice = await device(ALICE)
    keys = keystore_of(gateway)
    watchers = []
    try:
        for round_ in range(6):
            gone, live = (
                RawDevice(gateway.port, keys.provision(BOB, tmp_path / f"{name}{round_}", "coap://unused").context_dir)
                for name in ("gone", "live")
            )
            watchers += [gone, live]
            for watcher in (gone, live):
                reply = await watcher.exchange(Message(code=Code.GET, observe=0, uri_path=["p", ALICE]), b"\x01")
                assert reply.code == Code.CONTENT
            gone.close()
            await alice.publish(PresenceDocument(Status.OPEN, note=f"round {round_}"))
            notification = await live.receive(b"\x01", timeout=1.5)
            assert codec.decode_presence_view(notification.payload).note == f"round {round_}"
            assert live.last_mtype == aiocoap.CON
            live.close()
    finally:
        for watcher in watchers:
            watcher.close()
