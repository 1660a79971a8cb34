"""Change events between gateway processes.

The service reports every durable change (presence, rules, inbox, delivery records of
some user). Within one process the CoAP layer turns it into notifications directly.
With several processes (``--workers N`` on one machine, or several machines) the
watchers of a user may be attached to another process, so every change is also
published on a Redis channel; each process notifies its own observers of changes
made elsewhere. Events carry only (kind, user): notifications are rendered from the
shared store, so a lost or late event costs at most a delay, never wrong content.

One event is not a change: ``context`` (subject: a key id in hex) asks whichever
process holds that OSCORE context to let it go (``coap/handoff.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Protocol

import cbor2

from .core.ids import UserId
from .service import ChangeListener

log = logging.getLogger(__name__)

KINDS = ("presence", "rules", "inbox", "records", "context")


class EventBus(Protocol):
    async def start(self, deliver: Callable[[str, UserId], None]) -> None: ...

    def publish(self, kind: str, user: UserId) -> None: ...

    async def close(self) -> None: ...


class LocalBus:
    """One process: nothing to share."""

    async def start(self, deliver: Callable[[str, UserId], None]) -> None:
        pass

    def publish(self, kind: str, user: UserId) -> None:
        pass

    async def close(self) -> None:
        pass


class RedisBus:
    """Redis pub/sub: fire-and-forget fan-out to every gateway process.

    Events of the same few milliseconds go out as one message, each (kind, user) once:
    under load a publish per change cost a gateway process 15% of its CPU, sending and
    receiving. Receivers read the store again anyway, so merging loses nothing."""

    BATCH_SECONDS = 0.002

    def __init__(self, url: str, channel: str = "impp:events") -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url)
        self.channel = channel
        self.origin = os.urandom(8)  # our own events come back too: skip them
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[object]] = set()
        self._batch: dict[tuple[str, str], None] = {}  # insertion-ordered set
        self._flush_at: asyncio.TimerHandle | None = None
        self.messages_sent = 0

    async def start(self, deliver: Callable[[str, UserId], None]) -> None:
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self.channel)
        self._task = asyncio.create_task(self._listen(pubsub, deliver))

    async def _listen(self, pubsub: object, deliver: Callable[[str, UserId], None]) -> None:
        async for item in pubsub.listen():  # type: ignore[attr-defined]
            if item.get("type") != "message":
                continue
            events = _events_of(item["data"])
            if events is None:
                log.warning("ignoring a malformed event on %s", self.channel)
                continue
            origin, batch = events
            if origin == self.origin:
                continue
            for kind, user in batch:
                if kind in KINDS:
                    deliver(kind, UserId(user))

    def publish(self, kind: str, user: UserId) -> None:
        self._batch[(kind, user)] = None
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self.BATCH_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        if not self._batch:
            return
        events, self._batch = [list(event) for event in self._batch], {}
        self.messages_sent += 1
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            self._send(cbor2.dumps([self.origin, events]))
        )
        self._pending.add(task)
        task.add_done_callback(self._published)

    async def _send(self, payload: bytes) -> object:
        return await self._redis.publish(self.channel, payload)

    def _published(self, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("event not published: %s", task.exception())

    async def close(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()


def _events_of(data: bytes) -> tuple[bytes, list[tuple[str, str]]] | None:
    """``[origin, [[kind, user], ...]]``, or an older process's ``[origin, kind, user]``."""
    try:
        decoded = cbor2.loads(data)
        if len(decoded) == 3 and isinstance(decoded[1], str):
            origin, kind, user = decoded
            batch = [(kind, user)]
        else:
            origin, raw = decoded
            batch = [(kind, user) for kind, user in raw]
    except Exception:
        return None
    if not isinstance(origin, bytes) or not all(isinstance(k, str) and isinstance(u, str) for k, u in batch):
        return None
    return origin, batch


def open_bus(url: str | None) -> EventBus:
    """``None``/``local``: this process only; ``redis://host:port/db[?channel=NAME]``."""
    if url is None or url == "local":
        return LocalBus()
    if url.startswith(("redis://", "rediss://", "unix://")):
        base, _, query = url.partition("?")
        params = dict(item.partition("=")[::2] for item in query.split("&") if item)
        channel = params.pop("channel", "impp:events")
        rest = "&".join(f"{k}={v}" for k, v in params.items())
        return RedisBus(f"{base}?{rest}" if rest else base, channel)
    raise ValueError(f"unknown bus URL {url!r}: use redis://host:port/db[?channel=NAME]")


class SharedListener:
    """Notifies local observers at once and tells the other processes."""

    def __init__(self, local: ChangeListener, bus: EventBus) -> None:
        self.local = local
        self.bus = bus
        # Another process asks for a context (its key id): set by the OSCORE layer.
        self.on_context_asked: Callable[[bytes], None] = lambda kid: None

    def deliver(self, kind: str, user: UserId) -> None:
        if kind == "context":
            try:
                kid = bytes.fromhex(user)
            except ValueError:
                log.warning("ignoring a malformed context request")
                return
            self.on_context_asked(kid)
            return
        {
            "presence": self.local.presence_changed,
            "rules": self.local.rules_changed,
            "inbox": self.local.inbox_changed,
            "records": self.local.records_changed,
        }[kind](user)

    def ask_context(self, kid: bytes) -> None:
        self.bus.publish("context", UserId(kid.hex()))

    def presence_changed(self, user: UserId) -> None:
        self.local.presence_changed(user)
        self.bus.publish("presence", user)

    def rules_changed(self, user: UserId) -> None:
        self.local.rules_changed(user)
        self.bus.publish("rules", user)

    def inbox_changed(self, user: UserId) -> None:
        self.local.inbox_changed(user)
        self.bus.publish("inbox", user)

    def records_changed(self, sender: UserId) -> None:
        self.local.records_changed(sender)
        self.bus.publish("records", sender)
