"""Typed domain model: presence documents, instant messages, delivery records.

Presence and instant inboxes are independent (RFC 2779 2.1.1-2.1.3): a user record
says whether the identifier has a presentity, an inbox, or both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, NewType, TypeAlias

from .ids import UserId

if TYPE_CHECKING:
    from .access import AccessRules  # access builds on this module

MessageId = NewType("MessageId", bytes)
Seq = NewType("Seq", int)

# Values allowed in the presence extension map: kept verbatim, so future or private
# fields survive a round trip through a gateway that does not understand them.
ExtValue: TypeAlias = "int | str | bytes | bool | float | list[ExtValue] | dict[int | str, ExtValue] | None"


class Status(IntEnum):
    """Presence STATUS (RFC 2778 section 2.2): the two required values."""

    CLOSED = 0
    OPEN = 1


class DeliveryState(IntEnum):
    """What the sender learns about an instant message (RFC 2779 4.1.x, 7)."""

    QUEUED = 0  # accepted and durable, waiting for the recipient
    DELIVERED = 1  # SUCCESSFUL DELIVERY: the recipient's agent acknowledged it
    FAILED = 2  # see FailureReason


class FailureReason(IntEnum):
    NONE = 0
    UNKNOWN_RECIPIENT = 1
    REFUSED = 2
    TOO_LARGE = 3
    EXPIRED = 4


@dataclass(frozen=True, slots=True)
class Contact:
    """Contact means, modelled on vCard (RFC 6350): TEL, EMAIL, URL, ADR."""

    tel: str | None = None
    email: str | None = None
    url: str | None = None
    adr: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceDocument:
    """PRESENCE INFORMATION of one presentity.

    ``timestamp``, ``version`` and ``out_of_contact`` are set by the gateway;
    ``lease`` (seconds) by the publisher: when it runs out without a new publish,
    the presentity turns CLOSED and out of contact.
    """

    status: Status = Status.CLOSED
    note: str | None = None
    contact: Contact = field(default_factory=Contact)
    extensions: Mapping[int | str, ExtValue] = field(default_factory=dict)
    timestamp: int = 0
    version: int = 0
    lease: int | None = None
    out_of_contact: bool = False


@dataclass(frozen=True, slots=True)
class InstantMessage:
    """An INSTANT MESSAGE; ``msg_id`` is chosen by the sender and unique per sender."""

    msg_id: MessageId
    sender: UserId
    recipient: UserId
    payload: bytes
    content_format: int = 0  # CoAP Content-Format; 0 = text/plain;charset=utf-8
    reply_to: UserId | None = None
    created: int | None = None  # sender's clock, informative only
    ttl: int | None = None  # seconds the gateway may keep it undelivered


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    seq: Seq
    message: InstantMessage
    received: int


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """The sender's view of one message it sent."""

    msg_id: MessageId
    recipient: UserId
    state: DeliveryState
    reason: FailureReason = FailureReason.NONE
    updated: int = 0


@dataclass(frozen=True, slots=True)
class UserRecord:
    user: UserId
    has_presentity: bool = True
    has_inbox: bool = True


@dataclass(frozen=True, slots=True)
class SendFacts:
    """What accepting an IM depends on, read in one go: are sender and recipient
    registered, and the recipient's rules (None: it never set any). ``rules_stored`` is
    the rules as the store holds them, which the store compares when it is asked to
    enqueue only if these facts still hold."""

    sender: UserRecord | None
    recipient: UserRecord | None
    recipient_rules: AccessRules | None
    rules_stored: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    seq: Seq
    newly_stored: bool  # False: a resend of a message already stored (exactly once)
