"""One contract suite, run against every store backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.core import codec
from gateway.core.errors import Conflict
from gateway.core.ids import UserId
from gateway.core.model import (
    DeliveryState,
    FailureReason,
    InstantMessage,
    MessageId,
    PresenceDocument,
    Seq,
    Status,
    UserRecord,
)
from gateway.store import Store, open_store

A, B, C = UserId("a@x.org"), UserId("b@x.org"), UserId("c@x.org")
BACKENDS = ["sqlite-file", "memory"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = {"sqlite-file": f"sqlite:{tmp_path}/store.db", "memory": "memory:"}[request.param]
    the_store = await open_store(url)
    yield the_store
    await the_store.close()


def message(
    msg_id: bytes, sender: UserId = A, recipient: UserId = B, text: bytes = b"hi", ttl: int | None = None
) -> InstantMessage:
    return InstantMessage(MessageId(msg_id), sender, recipient, text, ttl=ttl)


async def enqueue(store: Store, msg: InstantMessage, received: int = 100) -> Seq:
    result = await store.enqueue(
        msg, codec.encode_message(msg), received, None if msg.ttl is None else received + msg.ttl
    )
    return result.seq


async def test_users(store: Store) -> None:
    assert await store.add_user(UserRecord(A)) is True
    assert await store.add_user(UserRecord(A, has_inbox=False)) is False
    assert await store.get_user(A) == UserRecord(A, has_presentity=True, has_inbox=False)
    assert await store.get_user(B) is None
    await store.add_user(UserRecord(B))
    assert [r.user for r in await store.list_users()] == [A, B]
    assert await store.remove_user(A) is True
    assert await store.remove_user(A) is False
    assert await store.get_user(A) is None


async def test_presence_round_trip_and_leases(store: Store) -> None:
    assert await store.get_presence(A) is None
    doc = PresenceDocument(Status.OPEN, note="n", extensions={"k": [1]}, timestamp=10, version=3, lease=5)
    await store.put_presence(A, doc, 15)
    assert await store.get_presence(A) == doc
    assert await store.due_leases(14) == []
    assert await store.due_leases(15) == [A]
    await store.put_presence(A, doc, None)
    assert await store.due_leases(10**9) == []


async def test_enqueue_is_idempotent_per_sender_and_id(store: Store) -> None:
    msg = message(b"1")
    first = await store.enqueue(msg, codec.encode_message(msg), 100, None)
    again = await store.enqueue(msg, codec.encode_message(msg), 101, None)
    assert first.newly_stored and not again.newly_stored and first.seq == again.seq
    # The same id from another sender is another message.
    other = message(b"1", sender=C)
    assert (await store.enqueue(other, codec.encode_message(other), 100, None)).newly_stored
    changed = message(b"1", text=b"different")
    with pytest.raises(Conflict):
        await store.enqueue(changed, codec.encode_message(changed), 102, None)
    assert [q.message.payload for q in await store.pending(B, Seq(0), 10)] == [b"hi", b"hi"]


async def test_pending_cursor_limit_and_acknowledge(store: Store) -> None:
    seqs = [await enqueue(store, message(bytes([i]))) for i in range(5)]
    await enqueue(store, message(b"for-c", recipient=C))
    assert seqs == sorted(seqs)
    assert [q.seq for q in await store.pending(B, Seq(0), 3)] == seqs[:3]
    assert [q.seq for q in await store.pending(B, seqs[2], 10)] == seqs[3:]
    assert await store.acknowledge(B, seqs[1], 200) == [A]
    assert [q.seq for q in await store.pending(B, Seq(0), 10)] == seqs[2:]
    assert await store.acknowledge(B, seqs[1], 201) == []  # idempotent
    records = await store.records(A, 10)
    assert [r.state for r in records[::-1]] == [DeliveryState.DELIVERED] * 2 + [DeliveryState.QUEUED] * 4
    assert records[-1].updated == 200
    assert len(await store.pending(C, Seq(0), 10)) == 1


async def test_expire_messages(store: Store) -> None:
    await enqueue(store, message(b"short", ttl=10), received=100)
    await enqueue(store, message(b"long", ttl=1000), received=100)
    await enqueue(store, message(b"forever"), received=100)
    assert await store.expire_messages(109) == []
    assert await store.expire_messages(110) == [(A, B)]
    assert await store.expire_messages(111) == []
    states = {r.msg_id: (r.state, r.reason) for r in await store.records(A, 10)}
    assert states[MessageId(b"short")] == (DeliveryState.FAILED, FailureReason.EXPIRED)
    assert states[MessageId(b"long")] == (DeliveryState.QUEUED, FailureReason.NONE)
    assert [q.message.msg_id for q in await store.pending(B, Seq(0), 10)] == [b"long", b"forever"]


async def test_delivered_messages_do_not_expire(store: Store) -> None:
    seq = await enqueue(store, message(b"m", ttl=10), received=100)
    await store.acknowledge(B, seq, 105)
    assert await store.expire_messages(1000) == []
    assert (await store.records(A, 1))[0].state is DeliveryState.DELIVERED


async def test_sqlite_reopen_keeps_everything(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path}/s.db"
    first = await open_store(url)
    await first.add_user(UserRecord(A))
    await enqueue(first, message(b"kept"))
    await first.put_presence(A, PresenceDocument(Status.OPEN, version=7), None)
    await first.close()
    second = await open_store(url)
    try:
        assert await second.get_user(A) == UserRecord(A)
        assert [q.message.payload for q in await second.pending(B, Seq(0), 10)] == [b"hi"]
        assert (await second.get_presence(A)) == PresenceDocument(Status.OPEN, version=7)
    finally:
        await second.close()


async def test_unknown_store_url_is_refused() -> None:
    with pytest.raises(ValueError, match="known schemes"):
        await open_store("mongodb://nowhere")
