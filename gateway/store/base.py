"""The core store interface every backend implements (one contract suite tests them all)."""

from __future__ import annotations

from typing import Protocol

from ..core.access import AccessRules
from ..core.ids import UserId
from ..core.model import (
    DeliveryRecord,
    EnqueueResult,
    InstantMessage,
    PresenceDocument,
    QueuedMessage,
    SendFacts,
    Seq,
    UserRecord,
)


class FactsChanged(Exception):
    """The facts an enqueue was decided on no longer hold: read them again."""


class Store(Protocol):
    """Durable state. Every write has reached stable storage when its coroutine returns."""

    async def add_user(self, record: UserRecord) -> bool:
        """Register; False if the user already existed (then its record is updated)."""
        ...

    async def get_user(self, user: UserId) -> UserRecord | None: ...

    async def get_send_facts(self, sender: UserId, recipient: UserId | None) -> SendFacts:
        """Sender's and recipient's registrations and the recipient's rules, in one round
        trip (every IM needs them); ``recipient`` None: only the sender's."""
        ...

    async def remove_user(self, user: UserId) -> bool:
        """Remove a user and its presence; its queued messages fail as UNKNOWN_RECIPIENT."""
        ...

    async def list_users(self) -> list[UserRecord]: ...

    async def get_presence(self, user: UserId) -> PresenceDocument | None: ...

    async def put_presence(self, user: UserId, doc: PresenceDocument, lease_deadline: int | None) -> None: ...

    async def due_leases(self, now: int) -> list[UserId]:
        """Presentities whose lease deadline is at or before ``now``."""
        ...

    async def get_rules(self, user: UserId) -> AccessRules | None:
        """The user's access rules, or None if it never set any (defaults apply)."""
        ...

    async def put_rules(self, user: UserId, rules: AccessRules) -> None: ...

    async def get_key_bundle(self, user: UserId) -> bytes | None:
        """The public keys the user published for end-to-end signing and encryption."""
        ...

    async def put_key_bundle(self, user: UserId, bundle: bytes) -> None: ...

    async def get_contacts(self, user: UserId) -> tuple[UserId, ...]:
        """The user's numbered contacts (alias n = entry n-1); empty if it set none."""
        ...

    async def put_contacts(self, user: UserId, contacts: tuple[UserId, ...]) -> None: ...

    async def enqueue(
        self, message: InstantMessage, body: bytes, received: int, expires: int | None, expect: SendFacts | None = None
    ) -> EnqueueResult:
        """Store a message durably, once per (sender, msg_id); raises Conflict if that id
        already holds another body or recipient. With ``expect``, a new message is stored
        only if the facts of its sender and recipient are still those (registrations and
        the recipient's stored rules, in the same transaction); otherwise nothing is
        stored and FactsChanged is raised."""
        ...

    async def pending(self, recipient: UserId, after: Seq, limit: int) -> list[QueuedMessage]:
        """Undelivered messages of ``recipient`` with seq > ``after``, oldest first."""
        ...

    async def acknowledge(self, recipient: UserId, upto: Seq, now: int) -> list[UserId]:
        """Mark queued messages with seq <= upto delivered; returns the senders to tell."""
        ...

    async def records(self, sender: UserId, limit: int) -> list[DeliveryRecord]:
        """The newest delivery records of messages ``sender`` sent, newest first."""
        ...

    async def expire_messages(self, now: int) -> list[tuple[UserId, UserId]]:
        """Fail queued messages whose ttl ran out; returns (sender, recipient) pairs affected."""
        ...

    async def close(self) -> None: ...


class StoreFactory(Protocol):
    async def __call__(self, url: str) -> Store: ...
