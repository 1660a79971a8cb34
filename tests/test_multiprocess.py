"""Several gateway processes sharing one store: changes made through one reach the
watchers and inboxes attached to another (events over Redis pub/sub)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_sim.client import DeviceClient, InboxBatch
from gateway.app import Gateway
from gateway.core.model import PresenceDocument, Status
from gateway.keys import KeyStore

from .conftest import ALICE, BOB, ManualClock, eventually, provisioned_device, start_gateway

REDIS_URL = os.environ.get("IMPP_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def _redis_reachable() -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(client.ping(), 2)
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture
async def two_gateways(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Gateway]]:
    if not await _redis_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is not reachable (CI must start it)")
        pytest.skip(f"Redis at {REDIS_URL} is not reachable")
    # A channel of our own, so parallel runs do not see each other's events.
    bus = f"{REDIS_URL}?channel=impp:test:{uuid.uuid4().hex}"
    clock = ManualClock()
    keys = KeyStore(tmp_path / "keys")
    first = await start_gateway(tmp_path / "shared.db", clock, keys=keys, bus=bus, sweep_interval=0.05)
    second = await start_gateway(tmp_path / "shared.db", clock, keys=keys, bus=bus, sweep_interval=0.05)
    yield first, second
    await first.close()
    await second.close()


async def _true(value: bool) -> bool:
    return value


async def test_presence_inbox_and_exactly_once_across_processes(
    two_gateways: tuple[Gateway, Gateway], tmp_path: Path
) -> None:
    first, second = two_gateways
    alice = await provisioned_device(first, ALICE, tmp_path / "devices")  # attached to the first
    bob = await provisioned_device(second, BOB, tmp_path / "devices")  # attached to the second
    seen: list[PresenceDocument] = []
    batches: list[InboxBatch] = []

    async def watch() -> None:
        async for doc in bob.watch(ALICE):
            seen.append(doc)

    async def inbox() -> None:
        async for batch in bob.watch_inbox():
            batches.append(batch)

    alice_via_second = await provisioned_device(second, ALICE, tmp_path / "devices")
    tasks = [asyncio.create_task(watch()), asyncio.create_task(inbox())]
    try:
        await eventually(lambda: _true(len(seen) == 1 and len(batches) == 1))
        # presence published through the first process notifies a watcher on the second
        await alice.publish(PresenceDocument(Status.OPEN, note="via first"))
        await eventually(lambda: _true(len(seen) == 2))
        assert seen[-1].note == "via first"
        # an IM sent through the first reaches bob's observation on the second, once,
        # even when resent through the second (exactly once across processes)
        msg_id = DeviceClient.new_message_id()
        seq = await alice.send(BOB, "hello across", msg_id=msg_id)
        assert await alice_via_second.send(BOB, "hello across", msg_id=msg_id) == seq
        await eventually(lambda: _true(sum(len(b.messages) for b in batches) >= 1))
        await asyncio.sleep(0.3)
        assert [m.message.payload for b in batches for m in b.messages] == [b"hello across"]
        # bob acknowledges on the second; alice's records, read on the first, say delivered
        await bob.acknowledge(seq)

        async def delivered() -> bool:
            return (await alice.delivery_records())[0].state.name == "DELIVERED"

        await eventually(delivered)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (alice, bob, alice_via_second):
            await client.close()
