"""The gateway's use cases: core rules applied to the store, with change events.

Independent of CoAP (the resource layer calls in) and of the backend (any Store).
The clock is injected so tests can move time by hand.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Protocol

from .core import codec, inbox, presence
from .core.errors import Forbidden, NotFound, PreconditionFailed
from .core.ids import Domain, UserId, domain_of
from .core.model import (
    DeliveryRecord,
    EnqueueResult,
    InstantMessage,
    PresenceDocument,
    QueuedMessage,
    Seq,
    Status,
    UserRecord,
)
from .store.base import Store

log = logging.getLogger(__name__)

FETCH_LIMIT = 64
RECORDS_LIMIT = 32


class ChangeListener(Protocol):
    """Told after a change is durable; the CoAP layer turns these into notifications."""

    def presence_changed(self, user: UserId) -> None: ...

    def inbox_changed(self, user: UserId) -> None: ...

    def records_changed(self, sender: UserId) -> None: ...


class NullListener:
    def presence_changed(self, user: UserId) -> None:
        pass

    def inbox_changed(self, user: UserId) -> None:
        pass

    def records_changed(self, sender: UserId) -> None:
        pass


class GatewayService:
    def __init__(
        self,
        store: Store,
        domains: Iterable[Domain],
        clock: Callable[[], float],
        listener: ChangeListener | None = None,
    ) -> None:
        self.store = store
        self.domains = frozenset(domains)
        self.clock = clock
        self.listener: ChangeListener = listener or NullListener()
        # Publishes, expiries and link-loss marks of one presentity are read-modify-write.
        self._presence_locks: defaultdict[UserId, asyncio.Lock] = defaultdict(asyncio.Lock)

    def now(self) -> int:
        return int(self.clock())

    # -- users ---------------------------------------------------------------------

    async def register(self, record: UserRecord) -> bool:
        if domain_of(record.user) not in self.domains:
            raise Forbidden(f"domain {domain_of(record.user)} is not served here")
        return await self.store.add_user(record)

    async def _user(self, user: UserId) -> UserRecord:
        if domain_of(user) not in self.domains:
            raise NotFound("domain not served here")
        record = await self.store.get_user(user)
        if record is None:
            raise NotFound("unknown user")
        return record

    async def _presentity(self, user: UserId) -> UserRecord:
        record = await self._user(user)
        if not record.has_presentity:
            raise NotFound("no presentity")
        return record

    async def _inbox(self, user: UserId) -> UserRecord:
        record = await self._user(user)
        if not record.has_inbox:
            raise NotFound("no inbox")
        return record

    # -- presence ------------------------------------------------------------------

    async def fetch_presence(self, user: UserId) -> PresenceDocument:
        await self._presentity(user)
        return await self.store.get_presence(user) or PresenceDocument()

    async def publish_presence(
        self, user: UserId, published: PresenceDocument, *, if_match: list[bytes] | None = None
    ) -> PresenceDocument:
        await self._presentity(user)
        async with self._presence_locks[user]:
            previous = await self.store.get_presence(user)
            if if_match is not None and presence.etag(previous or PresenceDocument()) not in if_match:
                raise PreconditionFailed("presence changed since that version")
            doc = presence.apply_publish(previous, published, self.now())
            await self.store.put_presence(user, doc, presence.lease_deadline(doc))
        self.listener.presence_changed(user)
        return doc

    async def withdraw_presence(self, user: UserId) -> PresenceDocument:
        await self._presentity(user)
        async with self._presence_locks[user]:
            doc = presence.withdraw(await self.store.get_presence(user), self.now())
            await self.store.put_presence(user, doc, None)
        self.listener.presence_changed(user)
        return doc

    async def mark_out_of_contact(self, user: UserId, *, only_if_expired: bool) -> bool:
        """Turn an OPEN presentity out of contact (lease ran out, or its link failed)."""
        async with self._presence_locks[user]:
            doc = await self.store.get_presence(user)
            if doc is None or doc.out_of_contact:
                return False
            now = self.now()
            if only_if_expired and not presence.is_lease_expired(doc, now):
                # Republished since the lease query: keep its new deadline.
                return False
            if not only_if_expired and doc.status is not Status.OPEN:
                return False
            await self.store.put_presence(user, presence.mark_out_of_contact(doc, now), None)
        log.info("presence %s: out of contact", user)
        self.listener.presence_changed(user)
        return True

    # -- instant messages ----------------------------------------------------------

    async def send_message(self, recipient: UserId, body: bytes) -> tuple[InstantMessage, EnqueueResult]:
        """Accept an IM durably. Immediate failures are answered by code: 4.04 unknown
        recipient (or no inbox), 4.03 refused, 4.13 too large; a later expiry shows in
        the sender's delivery records."""
        message = codec.decode_message(body, recipient)
        await self._inbox(recipient)
        if domain_of(message.sender) in self.domains and await self.store.get_user(message.sender) is None:
            raise Forbidden("unknown sender")
        received = self.now()
        # Store the canonical encoding, so a resend compares equal whatever its key order.
        canonical = codec.encode_message(message)
        result = await self.store.enqueue(message, canonical, received, inbox.expires_at(message, received))
        if result.newly_stored:
            self.listener.inbox_changed(recipient)
            self.listener.records_changed(message.sender)
        return message, result

    async def fetch_inbox(
        self, user: UserId, after: Seq, budget: int, *, for_notification: bool = False
    ) -> tuple[list[QueuedMessage], bool]:
        await self._inbox(user)
        queued = await self.store.pending(user, after, FETCH_LIMIT + 1)
        more_in_store = len(queued) > FETCH_LIMIT
        batch, more = inbox.fit_batch(queued[:FETCH_LIMIT], budget, at_least_one=not for_notification)
        return batch, more or more_in_store

    async def acknowledge(self, user: UserId, upto: Seq) -> None:
        await self._inbox(user)
        senders = await self.store.acknowledge(user, upto, self.now())
        for sender in senders:
            self.listener.records_changed(sender)
        if senders:
            self.listener.inbox_changed(user)

    async def delivery_records(self, sender: UserId) -> list[DeliveryRecord]:
        await self._user(sender)
        return await self.store.records(sender, RECORDS_LIMIT)

    # -- time-driven -----------------------------------------------------------------

    async def sweep(self) -> None:
        """Expire leases and message ttls that ran out by now."""
        now = self.now()
        for user in await self.store.due_leases(now):
            await self.mark_out_of_contact(user, only_if_expired=True)
        for sender, recipient in await self.store.expire_messages(now):
            self.listener.records_changed(sender)
            self.listener.inbox_changed(recipient)
