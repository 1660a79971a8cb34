"""One contract suite, run against every store backend."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.core import codec
from gateway.core.access import AccessRules, Field, View
from gateway.core.errors import Conflict
from gateway.core.ids import UserId
from gateway.core.model import (
    DeliveryState,
    EnqueueResult,
    FailureReason,
    InstantMessage,
    MessageId,
    PresenceDocument,
    SendFacts,
    Seq,
    Status,
    UserRecord,
)
from gateway.store import Store, open_store
from gateway.store.base import FactsChanged
from gateway.store.redis import RedisStore, parse_url
from gateway.store.sqlite import SqliteStore

A, B, C = UserId("a@x.org"), UserId("b@x.org"), UserId("c@x.org")
BACKENDS = ["sqlite-file", "memory", "redis"]
REDIS_URL = os.environ.get("IMPP_TEST_REDIS", "redis://127.0.0.1:6379/0")


@asynccontextmanager
async def redis_namespace() -> AsyncIterator[str]:
    """A key prefix of the caller's own on the test Redis; its keys are deleted afterwards.

    Without a reachable Redis the test is skipped on a developer's machine, but fails in CI
    (CI=true), where .ci/run must have started one."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisConnectionError, OSError) as err:
        await client.aclose()
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"Redis at {REDIS_URL} is unreachable in CI: {err}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable ({err}); start redis-server to test the Redis backend")
    prefix = f"impp-test-{secrets.token_hex(8)}:"
    try:
        yield prefix
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    async with redis_namespace() as prefix:
        yield prefix


def redis_url(prefix: str) -> str:
    return f"{REDIS_URL}?prefix={prefix}"


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "redis":
        async with redis_namespace() as prefix:
            the_store = await open_store(redis_url(prefix))
            yield the_store
            await the_store.close()
        return
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


async def test_send_facts_in_one_read(store: Store) -> None:
    assert await store.get_send_facts(A, B) == SendFacts(None, None, None)
    await store.add_user(UserRecord(A))
    await store.add_user(UserRecord(B, has_presentity=False))
    assert await store.get_send_facts(A, B) == SendFacts(UserRecord(A), UserRecord(B, has_presentity=False), None)
    rules = AccessRules(blocked=(C,))
    await store.put_rules(B, rules)
    assert await store.get_send_facts(A, B) == SendFacts(UserRecord(A), UserRecord(B, has_presentity=False), rules)
    assert await store.get_send_facts(C, B) == SendFacts(None, UserRecord(B, has_presentity=False), rules)
    assert await store.get_send_facts(A, None) == SendFacts(UserRecord(A), None, None)
    assert await store.get_send_facts(A, A) == SendFacts(UserRecord(A), UserRecord(A), None)
    await store.remove_user(B)
    assert await store.get_send_facts(A, B) == SendFacts(UserRecord(A), None, None)


async def test_enqueue_only_while_the_facts_hold(store: Store) -> None:
    """An enqueue decided on some facts stores nothing once they changed (a block, a
    removal, a registration), in the same transaction; a resend is answered anyway."""

    async def checked(msg: InstantMessage, facts: SendFacts) -> EnqueueResult:
        return await store.enqueue(msg, codec.encode_message(msg), 100, None, expect=facts)

    await store.add_user(UserRecord(A))
    await store.add_user(UserRecord(B))
    facts = await store.get_send_facts(A, B)
    assert (await checked(message(b"one"), facts)).newly_stored
    await store.put_rules(B, AccessRules(blocked=(A,)))
    with pytest.raises(FactsChanged):
        await checked(message(b"two"), facts)
    assert not (await checked(message(b"one"), facts)).newly_stored  # a resend: already stored
    blocked = await store.get_send_facts(A, B)
    assert (await checked(message(b"two"), blocked)).newly_stored  # the store compares, the service judges
    await store.put_rules(B, AccessRules())
    with pytest.raises(FactsChanged):  # other rules, though they admit A again
        await checked(message(b"three"), blocked)
    open_again = await store.get_send_facts(A, B)
    await store.add_user(UserRecord(B, has_inbox=False))
    with pytest.raises(FactsChanged):
        await checked(message(b"three"), open_again)
    current = await store.get_send_facts(A, B)
    await store.remove_user(A)
    with pytest.raises(FactsChanged):
        await checked(message(b"three"), current)
    assert [q.message.msg_id for q in await store.pending(B, Seq(0), 10)] == [b"one", b"two"]


async def test_presence_round_trip_and_leases(store: Store) -> None:
    assert await store.get_presence(A) is None
    doc = PresenceDocument(Status.OPEN, note="n", extensions={"k": [1]}, timestamp=10, version=3, lease=5)
    await store.put_presence(A, doc, 15)
    assert await store.get_presence(A) == doc
    assert await store.due_leases(14) == []
    assert await store.due_leases(15) == [A]
    await store.put_presence(A, doc, None)
    assert await store.due_leases(10**9) == []


async def test_rules_round_trip_and_removal(store: Store) -> None:
    assert await store.get_rules(A) is None
    rules = AccessRules(blocked=("c@x.org",), views={"*": View(Field.NOTE, note="busy")}, readers=(B,))
    await store.put_rules(A, rules)
    assert await store.get_rules(A) == rules
    await store.add_user(UserRecord(A))
    await store.remove_user(A)
    assert await store.get_rules(A) is None


async def test_key_bundles(store: Store) -> None:
    assert await store.get_key_bundle(A) is None
    await store.put_key_bundle(A, b"\xa1\x00\x41\x01")
    await store.put_key_bundle(A, b"\xa1\x00\x41\x02")
    assert await store.get_key_bundle(A) == b"\xa1\x00\x41\x02"
    await store.remove_user(A)
    assert await store.get_key_bundle(A) is None


async def test_contacts(store: Store) -> None:
    assert await store.get_contacts(A) == ()
    await store.put_contacts(A, (B,))
    await store.put_contacts(A, (B, A))
    assert await store.get_contacts(A) == (B, A)
    assert await store.get_contacts(B) == ()
    await store.remove_user(A)
    assert await store.get_contacts(A) == ()


async def test_removing_a_recipient_fails_its_queued_messages(store: Store) -> None:
    await store.add_user(UserRecord(B))
    await enqueue(store, message(b"waiting"))
    await store.remove_user(B)
    [record] = await store.records(A, 10)
    assert (record.state, record.reason) == (DeliveryState.FAILED, FailureReason.UNKNOWN_RECIPIENT)


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
    elsewhere = message(b"1", recipient=C)
    with pytest.raises(Conflict):
        await store.enqueue(elsewhere, codec.encode_message(elsewhere), 102, None)
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


async def test_schema_1_store_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from gateway.store import sqlite as sqlite_backend

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in sqlite_backend._SCHEMA:
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO users VALUES ('a@x.org', 1, 1)")
    db.commit()
    db.close()
    store = await open_store(f"sqlite:{path}")
    try:
        assert await store.get_user(A) == UserRecord(A)
        await store.put_rules(A, AccessRules())
        assert await store.get_rules(A) == AccessRules()
        await store.put_contacts(A, (B,))  # schema 3
        assert await store.get_contacts(A) == (B,)
    finally:
        await store.close()
    version = sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert int(version) == sqlite_backend.SCHEMA_VERSION


async def test_unknown_store_url_is_refused() -> None:
    with pytest.raises(ValueError, match="known schemes"):
        await open_store("mongodb://nowhere")


# -- Redis: several gateway processes sharing one store -----------------------------------


@pytest.fixture
async def two_redis_stores(redis_prefix: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one prefix, each with its own connection pool: two gateway processes.
    A batch of 1 makes acknowledge and expiry interleave message by message."""
    first = await RedisStore.open(redis_url(redis_prefix), batch=1)
    second = await RedisStore.open(redis_url(redis_prefix), batch=1)
    yield first, second
    await first.close()
    await second.close()


async def test_redis_racing_enqueues_store_a_message_once(two_redis_stores: tuple[RedisStore, RedisStore]) -> None:
    msg = message(b"raced")
    body = codec.encode_message(msg)
    results = await asyncio.gather(*(two_redis_stores[i % 2].enqueue(msg, body, 100 + i, None) for i in range(50)))
    assert sum(r.newly_stored for r in results) == 1
    assert len({r.seq for r in results}) == 1
    for the_store in two_redis_stores:
        assert [q.message.msg_id for q in await the_store.pending(B, Seq(0), 100)] == [b"raced"]
        assert len(await the_store.records(A, 100)) == 1


async def test_redis_acknowledge_and_expiry_never_both_win(two_redis_stores: tuple[RedisStore, RedisStore]) -> None:
    first, second = two_redis_stores
    # One sender per message, so each call's answer names exactly the messages it won.
    senders = [UserId(f"s{i}@x.org") for i in range(50)]
    seqs = [await enqueue(first, message(b"m", sender=s, ttl=10), received=100) for s in senders]
    acknowledged, expired = await asyncio.gather(first.acknowledge(B, max(seqs), 200), second.expire_messages(200))
    expired_senders = [s for s, recipient in expired if recipient == B]
    assert len(expired_senders) == len(expired)
    assert acknowledged and expired_senders  # with batches of 1 the two really interleaved
    assert not set(acknowledged) & set(expired_senders)
    assert sorted(acknowledged + expired_senders) == sorted(senders)
    for sender in senders:
        [record] = await second.records(sender, 10)
        if sender in acknowledged:
            assert (record.state, record.reason) == (DeliveryState.DELIVERED, FailureReason.NONE)
        else:
            assert (record.state, record.reason) == (DeliveryState.FAILED, FailureReason.EXPIRED)
        assert record.updated == 200
    assert await first.pending(B, Seq(0), 100) == []
    assert await first.acknowledge(B, max(seqs), 300) == []
    assert await second.expire_messages(300) == []


async def test_redis_batches_cover_everything(redis_prefix: str) -> None:
    the_store = await RedisStore.open(redis_url(redis_prefix), batch=3)
    try:
        for i in range(7):
            await enqueue(the_store, message(bytes([i]), sender=UserId(f"s{i}@x.org"), ttl=10 if i % 2 else None))
        expired = await the_store.expire_messages(110)
        assert sorted(s for s, _ in expired) == [f"s{i}@x.org" for i in (1, 3, 5)]
        acknowledged = await the_store.acknowledge(B, Seq(10**12), 120)
        assert sorted(acknowledged) == [f"s{i}@x.org" for i in (0, 2, 4, 6)]
    finally:
        await the_store.close()


async def test_redis_prefixes_keep_stores_apart(redis_prefix: str) -> None:
    one = await open_store(redis_url(redis_prefix + "one:"))
    other = await open_store(redis_url(redis_prefix + "other:"))
    try:
        await one.add_user(UserRecord(A))
        await enqueue(one, message(b"here"))
        assert await other.list_users() == []
        assert await other.pending(B, Seq(0), 10) == []
        assert (await enqueue(other, message(b"here", text=b"other text"))) == Seq(1)
    finally:
        await one.close()
        await other.close()


def test_redis_url_parsing() -> None:
    assert parse_url("redis://h:1/2?prefix=gw:&socket_timeout=5") == ("redis://h:1/2?socket_timeout=5", "gw:")
    assert parse_url("rediss://h") == ("rediss://h", "impp:")
    with pytest.raises(ValueError):
        parse_url("redis://h?prefix=")


def test_concurrent_first_opens_of_one_sqlite_file(tmp_path: Path) -> None:
    """Two processes (here threads with their own connections) creating the same new
    store at once: exactly one creates the schema, both open it."""
    import threading

    from gateway.store.sqlite import SqliteStore

    path = str(tmp_path / "race.db")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def open_it() -> None:
        store = SqliteStore(path)
        barrier.wait()
        try:
            store._open()
        except BaseException as exc:
            errors.append(exc)
        finally:
            if store._db is not None:
                store._db.close()
            store._executor.shutdown()

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


async def test_redis_calls_are_bounded_and_recover(redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that stops answering costs a store call at most CALL_TIMEOUT_S (then
    TimeoutError: the gateway answers 5.03), and the store works again after it."""
    from gateway.store import redis as redis_backend

    store = await RedisStore.open(redis_url(redis_prefix))
    pauser = aioredis.from_url(REDIS_URL)
    try:
        await store.add_user(UserRecord(A))
        monkeypatch.setattr(redis_backend, "CALL_TIMEOUT_S", 0.2)
        await pauser.execute_command("CLIENT", "PAUSE", "700", "ALL")
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await store.get_user(A)
        assert asyncio.get_running_loop().time() - started < 0.6
        await asyncio.sleep(0.7)
        assert await store.get_user(A) == UserRecord(A)
    finally:
        await pauser.execute_command("CLIENT", "UNPAUSE")
        await pauser.aclose()
        await store.close()


async def test_redis_bursts_wait_for_a_connection(redis_prefix: str) -> None:
    """Far more concurrent calls than connections: each waits for one, none fails."""
    from gateway.store import redis as redis_backend

    store = await RedisStore.open(redis_url(redis_prefix))
    try:
        await store.add_user(UserRecord(A))
        burst = 5 * redis_backend.MAX_CONNECTIONS
        results = await asyncio.gather(*(store.get_send_facts(A, A) for _ in range(burst)))
        assert results == [SendFacts(UserRecord(A), UserRecord(A), None)] * burst
    finally:
        await store.close()


async def test_sqlite_enqueues_share_one_commit_each_answered_alone(tmp_path: Path) -> None:
    """Concurrent enqueues are committed together (one fsync), each in a savepoint: a
    conflict or changed facts refuses that one only, the others are stored, and each
    answer comes after the commit."""
    store = await SqliteStore.open(str(tmp_path / "group.db"))
    try:
        await store.add_user(UserRecord(A))
        await store.add_user(UserRecord(B))
        facts = await store.get_send_facts(A, B)
        stale = SendFacts(UserRecord(A), UserRecord(B), AccessRules(blocked=(C,)))
        first = message(b"first")
        await store.enqueue(first, codec.encode_message(first), 100, None)
        commits_before = store.commits
        msgs = [message(bytes([i])) for i in range(40)]
        clash = message(b"first", text=b"other text")  # the id of a stored message, another body
        results = await asyncio.gather(
            *(store.enqueue(m, codec.encode_message(m), 100, None, expect=facts) for m in msgs),
            store.enqueue(clash, codec.encode_message(clash), 100, None),
            store.enqueue(message(b"stale"), codec.encode_message(message(b"stale")), 100, None, expect=stale),
            store.enqueue(msgs[0], codec.encode_message(msgs[0]), 100, None),  # a resend in the same batch
            return_exceptions=True,
        )
        stored, conflict, refused, resend = results[:40], results[40], results[41], results[42]
        assert all(isinstance(r, EnqueueResult) and r.newly_stored for r in stored)
        assert isinstance(conflict, Conflict) and isinstance(refused, FactsChanged)
        assert isinstance(resend, EnqueueResult) and not resend.newly_stored
        assert resend.seq == stored[0].seq  # type: ignore[union-attr]
        assert store.commits - commits_before < 10  # 43 enqueues, far fewer commits
        pending = await store.pending(B, Seq(0), 100)
        assert [q.message.msg_id for q in pending] == [b"first", *(bytes([i]) for i in range(40))]
    finally:
        await store.close()
