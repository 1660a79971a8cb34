"""The event bus between gateway processes (gateway/bus.py), over the real Redis:
events of a few milliseconds travel as one message, each (kind, user) once, never
back to their sender; an older process's single events and garbage are handled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import cbor2
import pytest
import redis.asyncio as aioredis

from gateway.bus import RedisBus
from gateway.core.ids import UserId

from .conftest import REDIS, eventually, redis_or_skip


@pytest.fixture
async def channel() -> AsyncIterator[str]:
    await redis_or_skip()
    yield f"impp-test-bus-{uuid.uuid4().hex}"


async def _true(value: bool) -> bool:
    return value


async def test_events_are_batched_deduplicated_and_not_echoed(channel: str) -> None:
    sender, receiver = RedisBus(REDIS, channel), RedisBus(REDIS, channel)
    echoed: list[tuple[str, str]] = []
    got: list[tuple[str, str]] = []
    await sender.start(lambda kind, user: echoed.append((kind, user)))
    await receiver.start(lambda kind, user: got.append((kind, user)))
    try:
        users = [UserId(f"u{i}@example.org") for i in range(100)]
        for user in users + users:  # every event twice, all within one batch window
            sender.publish("inbox", user)
        sender.publish("presence", users[0])
        expected = [("inbox", u) for u in users] + [("presence", users[0])]
        await eventually(lambda: _true(got == expected))
        assert sender.messages_sent == 1
        await asyncio.sleep(0.1)
        assert echoed == [] and got == expected
    finally:
        await sender.close()
        await receiver.close()


async def test_single_events_of_older_processes_and_garbage(channel: str) -> None:
    receiver = RedisBus(REDIS, channel)
    got: list[tuple[str, str]] = []
    await receiver.start(lambda kind, user: got.append((kind, user)))
    raw = aioredis.from_url(REDIS)
    try:
        for data in (b"\xff\x00", cbor2.dumps([b"other", [[1, 2]]]), cbor2.dumps([b"other", "nope"])):
            await raw.publish(channel, data)
        await raw.publish(channel, cbor2.dumps([b"older", "rules", "a@example.org"]))
        await raw.publish(channel, cbor2.dumps([b"newer", [["inbox", "b@example.org"], ["unknown", "c@x.org"]]]))
        await eventually(lambda: _true(got == [("rules", "a@example.org"), ("inbox", "b@example.org")]))
    finally:
        await raw.aclose()
        await receiver.close()


async def test_closing_sends_what_is_waiting(channel: str) -> None:
    sender, receiver = RedisBus(REDIS, channel), RedisBus(REDIS, channel)
    got: list[tuple[str, str]] = []
    await sender.start(lambda kind, user: None)
    await receiver.start(lambda kind, user: got.append((kind, user)))
    try:
        sender.publish("records", UserId("a@example.org"))
        await sender.close()  # before the batch window ended
        await eventually(lambda: _true(got == [("records", "a@example.org")]))
    finally:
        await receiver.close()
