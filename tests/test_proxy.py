"""Through a standard CoAP forward proxy (aiocoap's own ``aiocoap-proxy --forward``),
with OSCORE end to end between device and gateway (RFC 2779 2.4.1-2.4.3, 3.3.3)."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiocoap import Code

from device_sim.client import DeviceClient, RequestFailed
from gateway.app import Gateway
from gateway.core.access import AccessRules
from gateway.core.ids import UserId
from gateway.core.model import PresenceDocument, Status

from .conftest import ALICE, BOB, CAROL, keystore_of

MakeDevice = Callable[..., Awaitable[DeviceClient]]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[str]:
    """aiocoap's forward proxy program on a loopback port (device_sim.proxy: with its Observe bug fixed)."""
    port = _free_udp_port()
    log = (tmp_path / "proxy.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "device_sim.proxy", "--forward", "--bind", f"127.0.0.1:{port}",
        stdout=log, stderr=log,
    )
    uri = f"coap://127.0.0.1:{port}"
    try:
        await _until_listening(port, process)
        yield uri
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


async def _until_listening(port: int, process: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        if process.returncode is not None:
            raise RuntimeError("aiocoap-proxy exited")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return  # bound by the proxy
        await asyncio.sleep(0.05)
    raise RuntimeError("aiocoap-proxy did not bind")


async def _via(gateway: Gateway, user: UserId, proxy: str, tmp_path: Path) -> DeviceClient:
    base = f"coap://127.0.0.1:{gateway.port}"
    creds = keystore_of(gateway).provision(user, tmp_path / "via-proxy", base)
    return await DeviceClient.create(base, user, timeout=15, credentials=creds.credentials_file, proxy=proxy)


async def test_ims_and_presence_through_a_forward_proxy(
    gateway: Gateway, device: MakeDevice, proxy: str, tmp_path: Path
) -> None:
    alice = await device(ALICE)  # direct
    bob = await _via(gateway, BOB, proxy, tmp_path)
    try:
        # an IM from behind the proxy, and its delivery back through it
        seq = await bob.send(ALICE, "through the proxy")
        [queued] = (await alice.fetch_inbox()).messages
        assert (queued.seq, queued.message.sender, queued.message.payload) == (seq, BOB, b"through the proxy")
        await alice.send(BOB, "and back")
        assert [m.message.payload for m in (await bob.fetch_inbox()).messages] == [b"and back"]
        # a subscription and its notifications through the proxy
        updates = bob.watch(ALICE)
        assert (await asyncio.wait_for(anext(updates), 10)).status is Status.CLOSED
        await alice.publish(PresenceDocument(Status.OPEN, note="seen through a proxy"))
        assert (await asyncio.wait_for(anext(updates), 10)).note == "seen through a proxy"
        assert [w.watcher for w in await alice.watchers()] == [BOB]  # Bob, not the proxy
        await updates.aclose()
    finally:
        await bob.close()


async def test_a_proxy_never_serves_protected_presence_to_someone_the_rules_exclude(
    gateway: Gateway, device: MakeDevice, proxy: str, tmp_path: Path
) -> None:
    """Bob may see Alice's presence, Carol may not; both ask through the same proxy, Bob
    first. Protected responses are bound to the request that asked (OSCORE), so nothing
    Bob got can be served to Carol: she gets Alice's refusal."""
    alice = await device(ALICE)
    await alice.put_rules(AccessRules(fetchers=("bob@example.org",)))
    await alice.publish(PresenceDocument(Status.OPEN, note="for bob only"))
    bob, carol = await _via(gateway, BOB, proxy, tmp_path), await _via(gateway, CAROL, proxy, tmp_path)
    try:
        assert (await bob.fetch_presence(ALICE)).note == "for bob only"
        with pytest.raises(RequestFailed) as refused:
            await carol.fetch_presence(ALICE)
        assert refused.value.code == Code.FORBIDDEN
        assert (await bob.fetch_presence(ALICE)).note == "for bob only"
    finally:
        await bob.close()
        await carol.close()
