"""Instant inboxes over real UDP: send, read with a cursor, acknowledge, delivery records."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import cbor2
import pytest
from aiocoap import Code

from device_sim.client import DeviceClient, InboxBatch, RequestFailed
from gateway.app import Gateway
from gateway.core import codec
from gateway.core.model import DeliveryState, FailureReason, InstantMessage, MessageId

from .conftest import ALICE, BOB, CAROL, ManualClock, eventually

MakeDevice = Callable[..., Awaitable[DeviceClient]]


async def test_send_fetch_ack_and_delivery_record(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    seq = await alice.send(BOB, "hello", msg_id=MessageId(b"m1"), reply_to=CAROL)
    batch = await bob.fetch_inbox()
    assert [(m.seq, m.message.sender, m.message.payload, m.message.reply_to) for m in batch.messages] == [
        (seq, ALICE, b"hello", CAROL)
    ]
    assert batch.cursor == seq and not batch.more
    [record] = await alice.delivery_records()
    assert (record.msg_id, record.recipient, record.state) == (b"m1", BOB, DeliveryState.QUEUED)
    await bob.acknowledge(batch.cursor)
    [record] = await alice.delivery_records()
    assert record.state is DeliveryState.DELIVERED
    assert (await bob.fetch_inbox()).messages == []


async def test_resend_same_id_is_delivered_once(device: MakeDevice) -> None:
    """A lost 2.01 makes a device resend; the gateway keeps one copy (exactly once)."""
    alice, bob = await device(ALICE), await device(BOB)
    first = await alice.send(BOB, "only once", msg_id=MessageId(b"same"))
    again = await alice.send(BOB, "only once", msg_id=MessageId(b"same"))
    assert first == again
    batch = await bob.fetch_inbox()
    assert [m.message.payload for m in batch.messages] == [b"only once"]
    await bob.acknowledge(batch.cursor)
    # A resend arriving after delivery is still recognised and not delivered again.
    assert await alice.send(BOB, "only once", msg_id=MessageId(b"same")) == first
    assert (await bob.fetch_inbox()).messages == []


async def test_conflicting_resend_is_4_09(device: MakeDevice) -> None:
    alice = await device(ALICE)
    await alice.send(BOB, "one", msg_id=MessageId(b"x"))
    with pytest.raises(RequestFailed) as err:
        await alice.send(BOB, "another", msg_id=MessageId(b"x"))
    assert err.value.code == Code.CONFLICT


async def test_store_and_forward_for_away_device(gateway: Gateway, device: MakeDevice) -> None:
    alice = await device(ALICE)
    sent = [await alice.send(CAROL, f"note {i}") for i in range(5)]
    # Carol was never connected; she comes back later with a fresh client.
    carol = await device(CAROL)
    batch = await carol.fetch_inbox()
    assert [m.seq for m in batch.messages] == sent
    assert [m.message.payload for m in batch.messages] == [f"note {i}".encode() for i in range(5)]


async def test_ttl_expiry_fails_as_expired(gateway: Gateway, device: MakeDevice, clock: ManualClock) -> None:
    alice, carol = await device(ALICE), await device(CAROL)
    await alice.send(CAROL, "call me within a minute", msg_id=MessageId(b"t"), ttl=60)
    await alice.send(CAROL, "no hurry", msg_id=MessageId(b"n"))
    clock.advance(61)

    async def expired() -> bool:
        records = {r.msg_id: r for r in await alice.delivery_records()}
        return records[MessageId(b"t")].state is DeliveryState.FAILED

    await eventually(expired)
    records = {r.msg_id: r for r in await alice.delivery_records()}
    assert records[MessageId(b"t")].reason is FailureReason.EXPIRED
    assert records[MessageId(b"n")].state is DeliveryState.QUEUED
    assert [m.message.payload for m in (await carol.fetch_inbox()).messages] == [b"no hurry"]


async def test_unknown_recipient_is_4_04(device: MakeDevice) -> None:
    alice = await device(ALICE)
    for recipient in ("nobody@example.org", "bob@other.example"):
        with pytest.raises(RequestFailed) as err:
            await alice.send(recipient, "hi")  # type: ignore[arg-type]
        assert err.value.code == Code.NOT_FOUND


async def test_too_large_is_4_13(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    with pytest.raises(RequestFailed) as err:
        await alice.send(BOB, b"x" * (codec.MAX_IM_PAYLOAD + 1))
    assert err.value.code == Code.REQUEST_ENTITY_TOO_LARGE and "payload" in err.value.diagnostic
    assert (await bob.fetch_inbox()).messages == []


async def test_unknown_sender_is_refused_4_03(device: MakeDevice) -> None:
    bob = await device(BOB)
    body = codec.encode_message(InstantMessage(MessageId(b"1"), "ghost@example.org", BOB, b"boo"))  # type: ignore[arg-type]
    response = await bob.request(Code.POST, f"/i/{BOB}", body)
    assert response.code == Code.FORBIDDEN and b"sender" in response.payload


async def test_malformed_messages_are_4_00_and_nothing_is_stored(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    for body in (
        b"\x00garbage",
        cbor2.dumps({0: b"1", 1: ALICE}),
        cbor2.dumps({0: "text-id", 1: ALICE, 5: b""}),
        cbor2.dumps({0: b"1", 1: ALICE, 5: "text not bytes"}),
    ):
        response = await alice.request(Code.POST, f"/i/{BOB}", body)
        assert response.code == Code.BAD_REQUEST and response.payload
    assert (await bob.fetch_inbox()).messages == []


async def test_inbox_observe_signals_new_messages(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    batches: list[InboxBatch] = []

    async def watch() -> None:
        async for batch in bob.watch_inbox():
            batches.append(batch)

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(len(batches) == 1))
        assert batches[0].messages == []
        texts = [f"m{i}" for i in range(6)]
        for text in texts:
            await alice.send(BOB, text)
        # Notifications keep only the latest state, so several sends may arrive in one
        # notification; each message reaches the application exactly once.
        await eventually(lambda: _true(sum(len(b.messages) for b in batches) == len(texts)))
        assert [m.message.payload.decode() for b in batches for m in b.messages] == texts
    finally:
        task.cancel()


async def _true(value: bool) -> bool:
    return value


async def test_large_queue_is_paged_by_cursor(device: MakeDevice) -> None:
    alice, carol = await device(ALICE), await device(CAROL)
    texts = [f"{i:03d} " + "é" * 300 for i in range(12)]  # ~600 B each: several pages
    for text in texts:
        await alice.send(CAROL, text)
    received: list[str] = []
    cursor, pages = 0, 0
    while True:
        batch = await carol.fetch_inbox(cursor)
        pages += 1
        received += [m.message.payload.decode() for m in batch.messages]
        cursor = batch.cursor or cursor
        if not batch.more:
            break
    assert received == texts and pages > 1
    await carol.acknowledge(cursor)
    assert all(r.state is DeliveryState.DELIVERED for r in await alice.delivery_records())


async def test_non_ascii_and_binary_payloads_arrive_intact(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    payloads = ["Привет, 世界! 🚀".encode(), bytes(range(256)), b""]
    for payload in payloads:
        await alice.send(BOB, payload, content_format=42)  # 42 = application/octet-stream
    batch = await bob.fetch_inbox()
    assert [m.message.payload for m in batch.messages] == payloads
    assert {m.message.content_format for m in batch.messages} == {42}


async def test_acknowledge_needs_a_cursor(device: MakeDevice) -> None:
    bob = await device(BOB)
    for path in (f"/i/{BOB}", f"/i/{BOB}?c=abc", f"/i/{BOB}?c=-1", f"/i/{BOB}?c=99999999999999999999"):
        response = await bob.request(Code.DELETE, path)
        assert response.code == Code.BAD_REQUEST, path
