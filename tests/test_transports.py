"""Networks that block UDP (RFC 2779 2.4.4): CoAP over TCP and over WebSockets
(RFC 8323), with OSCORE, interworking with devices on UDP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from gateway.app import WS_PORT_OFFSET, Gateway
from gateway.core.model import PresenceDocument, Status

from .conftest import ALICE, BOB, ManualClock, eventually, keystore_of, start_gateway


def free_port_for_udp_and_tcp(offsets: tuple[int, ...] = (0,)) -> int:
    """A port free for UDP and TCP (and TCP at each offset)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
        if port + max(offsets) > 65535:
            continue
        try:
            for offset in offsets:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                    tcp.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


@pytest.fixture
async def multi_transport_gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, int]]:
    port = free_port_for_udp_and_tcp((0, WS_PORT_OFFSET))
    gateway = await start_gateway(
        tmp_path / "gw.db", ManualClock(), bind=("127.0.0.1", port), transports=("udp", "tcp", "ws")
    )
    yield gateway, port
    await gateway.close()


async def _device(gateway: Gateway, user: str, base: str, tmp_path: Path, proxy: str | None = None) -> DeviceClient:
    creds = keystore_of(gateway).provision(user, tmp_path / "devices", base)  # type: ignore[arg-type]
    return await DeviceClient.create(base, user, timeout=10, credentials=creds.credentials_file, proxy=proxy)  # type: ignore[arg-type]


async def _true(value: bool) -> bool:
    return value


async def test_coap_over_tcp_and_websockets_with_oscore(
    multi_transport_gateway: tuple[Gateway, int], tmp_path: Path
) -> None:
    gateway, port = multi_transport_gateway
    alice = await _device(gateway, ALICE, f"coap+tcp://127.0.0.1:{port}", tmp_path)
    bob = await _device(gateway, BOB, f"coap+ws://127.0.0.1:{port + WS_PORT_OFFSET}", tmp_path)
    udp_bob = await _device(gateway, BOB, f"coap://127.0.0.1:{port}", tmp_path)
    seen: list[PresenceDocument] = []

    async def watch() -> None:
        async for doc in bob.watch(ALICE):  # over WebSockets
            seen.append(doc)

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(len(seen) == 1))
        await alice.publish(PresenceDocument(Status.OPEN, note="over TCP"))  # over TCP
        await eventually(lambda: _true(len(seen) == 2))
        assert seen[-1].note == "over TCP"
        await alice.send(BOB, "from a TCP-only network")
        assert [m.message.sender for m in (await bob.fetch_inbox()).messages] == [ALICE]
        assert [m.message.payload for m in (await udp_bob.fetch_inbox()).messages] == [b"from a TCP-only network"]
    finally:
        task.cancel()
        for client in (alice, bob, udp_bob):
            await client.close()
