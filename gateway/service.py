"""The gateway's use cases: core rules applied to the store, with change events.

Independent of CoAP (the resource layer calls in) and of the backend (any Store).
The clock is injected so tests can move time by hand.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from . import e2e
from .core import access, codec, inbox, presence
from .core.access import AccessRules, ReadKind, Verdict
from .core.errors import (
    CodecError,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    StoreUnavailable,
    Unauthorized,
)
from .core.ids import Address, Domain, UserId, domain_of, in_domain
from .core.model import (
    DeliveryRecord,
    EnqueueResult,
    InstantMessage,
    PresenceDocument,
    QueuedMessage,
    SendFacts,
    Seq,
    Status,
    UserRecord,
)
from .store.base import FactsChanged, Store

log = logging.getLogger(__name__)

FETCH_LIMIT = 64
RECORDS_LIMIT = 32
MAX_KEY_BUNDLE = 512
RECENT_SEND_FACTS = 10_000  # (sender, recipient) pairs whose facts are kept for the next IM
UNKNOWN_SENDER = "unknown sender: not a registered user"


# Who asks: the principal its OSCORE context authenticates, or None (anonymous).
Requester = UserId | None


@dataclass(frozen=True, slots=True)
class PresenceSnapshot:
    rules: AccessRules
    document: PresenceDocument | None  # None: not read yet


@dataclass(frozen=True, slots=True)
class PresenceView:
    """The document as one requester may see it, and why."""

    document: PresenceDocument
    verdict: Verdict


class PeerGateways(Protocol):
    """The gateways of other domains (``gateway/federation.py``)."""

    async def send_message(self, sender: UserId, recipient: UserId, body: bytes) -> Seq:
        """Hand an IM to the recipient's gateway; its seq there once it is stored."""
        ...


class ChangeListener(Protocol):
    """Told after a change is durable; the CoAP layer turns these into notifications."""

    def presence_changed(self, user: UserId) -> None: ...

    def rules_changed(self, user: UserId) -> None: ...

    def inbox_changed(self, user: UserId) -> None: ...

    def records_changed(self, sender: UserId) -> None: ...


class NullListener:
    def presence_changed(self, user: UserId) -> None:
        pass

    def rules_changed(self, user: UserId) -> None:
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
        admins: Iterable[UserId] = (),
    ) -> None:
        self.store = store
        self.domains = frozenset(domains)
        self.admins = frozenset(admins)
        self.clock = clock
        self.listener: ChangeListener = listener or NullListener()
        self.peers: PeerGateways | None = None  # set when federation is on
        # Publishes, expiries and link-loss marks of one presentity are read-modify-write.
        self._presence_locks: defaultdict[UserId, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._recent_send_facts: dict[tuple[UserId, UserId], SendFacts] = {}

    def now(self) -> int:
        return int(self.clock())

    def serves(self, user: UserId) -> bool:
        return domain_of(user) in self.domains

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
        if (refusal := self._inbox_refusal(record)) is not None:
            raise refusal
        return record

    @staticmethod
    def _inbox_refusal(record: UserRecord | None) -> NotFound | None:
        if record is None:
            return NotFound("unknown user")
        if not record.has_inbox:
            return NotFound("no inbox")
        return None

    # -- access rules --------------------------------------------------------------

    def is_admin_of(self, requester: Requester, user: UserId) -> bool:
        """An administrator of ``user``'s domain: each domain is administered on its own
        (RFC 2779 2.1.4), also when one gateway serves several."""
        return requester is not None and requester in self.admins and domain_of(requester) == domain_of(user)

    async def rules_of(self, user: UserId) -> AccessRules:
        return await self.store.get_rules(user) or access.DEFAULT_RULES

    def _require_principal(self, requester: Requester, what: str) -> UserId:
        if requester is None:
            raise Unauthorized(f"authenticate (OSCORE) to {what}")
        return requester

    def _require_owner(self, user: UserId, requester: Requester, what: str, *, admin_too: bool) -> None:
        """The principal itself; with ``admin_too``, an administrator as well."""
        if self._require_principal(requester, what) != user and not (admin_too and self.is_admin_of(requester, user)):
            raise Forbidden(f"only {user} may {what}")

    async def _known(self, user: UserId, requester: Requester, what: str) -> None:
        """Anonymous requesters learn nothing, not even whether a user exists."""
        if requester is None:
            raise Unauthorized(f"authenticate (OSCORE) to {what}")
        await self._user(user)

    async def authorize_owner(self, user: UserId, requester: Requester, what: str) -> None:
        """Subscription management: the principal, or an administrator (RFC 2779 §5
        lets administrators hold more powers than principals; ours are: read rules,
        list watchers and subscriptions, cancel subscriptions)."""
        await self._known(user, requester, what)
        self._require_owner(user, requester, what, admin_too=True)

    async def get_rules(self, user: UserId, requester: Requester) -> AccessRules:
        await self.authorize_owner(user, requester, "read these rules")
        return await self.rules_of(user)

    async def put_rules(self, user: UserId, rules: AccessRules, requester: Requester) -> None:
        """Only the principal: an administrator who could rewrite rules could grant
        itself the inbox or the presence it must not have."""
        await self._known(user, requester, "change these rules")
        self._require_owner(user, requester, "change these rules", admin_too=False)
        await self.store.put_rules(user, rules)
        self.listener.rules_changed(user)

    # -- contacts and short addresses ----------------------------------------------------

    async def get_contacts(self, user: UserId, requester: Requester) -> tuple[UserId, ...]:
        await self._known(user, requester, "read these contacts")
        self._require_owner(user, requester, "read these contacts", admin_too=False)
        return await self.store.get_contacts(user)

    async def put_contacts(self, user: UserId, contacts: tuple[UserId, ...], requester: Requester) -> None:
        """The numbered list behind the aliases of the principal's paths. Private: it
        grants nothing and tells nobody else anything."""
        await self._known(user, requester, "change these contacts")
        self._require_owner(user, requester, "change these contacts", admin_too=False)
        await self.store.put_contacts(user, contacts)

    async def contact_numbers(self, requester: Requester) -> dict[UserId, int]:
        """The requester's contacts by number, for bodies that name users that way (``?a``)."""
        principal = self._require_principal(requester, "use contact numbers")
        return {user: n for n, user in enumerate(await self.store.get_contacts(principal), start=1)}

    async def resolve(self, address: Address, requester: Requester) -> UserId:
        """The user a path names: in full; by local part, in the requester's domain (or,
        for anonymous requesters, the one domain served); by the requester's contact
        number; or, with no user segment, the requester itself."""
        if address.user is not None:
            return address.user
        if address.local is not None:
            if requester is not None:
                return in_domain(address.local, domain_of(requester))
            if len(self.domains) == 1:
                return in_domain(address.local, next(iter(self.domains)))
            raise NotFound("user@domain expected: this gateway serves several domains")
        principal = self._require_principal(requester, "use short addresses")
        if address.alias is None:
            return principal
        contacts = await self.store.get_contacts(principal)
        if address.alias > len(contacts):
            raise NotFound(f"no contact {address.alias} (see /c)")
        return contacts[address.alias - 1]

    # -- published public keys (end-to-end signing and encryption) ----------------------

    async def get_key_bundle(self, user: UserId) -> bytes:
        """Public keys are public: anyone may fetch them (the gateway's OSCORE response
        vouches that they are the ones ``user`` published)."""
        await self._user(user)
        bundle = await self.store.get_key_bundle(user)
        if bundle is None:
            raise NotFound(f"{user} published no keys")
        return bundle

    async def put_key_bundle(self, user: UserId, bundle: bytes, requester: Requester) -> None:
        await self._user(user)
        if self._require_principal(requester, "publish keys") != user:
            raise Forbidden(f"only {user} may publish its keys")
        if len(bundle) > MAX_KEY_BUNDLE:
            raise PayloadTooLarge(f"key bundle over {MAX_KEY_BUNDLE} bytes")
        try:
            e2e.KeyBundle.decode(bundle)  # strict: two public COSE_Keys, nothing else
        except e2e.BundleError as exc:
            raise CodecError(f"key bundle: {exc}") from exc
        await self.store.put_key_bundle(user, bundle)

    # -- presence ------------------------------------------------------------------

    async def presence_snapshot(self, user: UserId) -> PresenceSnapshot:
        """The document and rules of a presentity as they are now: one read of the store
        to render the notifications of all its watchers after a change."""
        await self._presentity(user)
        return PresenceSnapshot(await self.rules_of(user), await self.store.get_presence(user) or PresenceDocument())

    async def view_presence(
        self, user: UserId, requester: Requester, kind: ReadKind, snapshot: PresenceSnapshot | None = None
    ) -> PresenceView:
        """Fetch (or render a notification) under the presentity's rules (2.3.1-2.3.3).
        The rules apply whether or not the presentity is in contact. ``snapshot``: taken
        by :meth:`presence_snapshot` since the last change, instead of reading the store."""
        if snapshot is None:
            if requester is None and await self.store.get_user(user) is None:
                raise Unauthorized("authenticate (OSCORE) to see this presence")
            await self._presentity(user)
            snapshot = PresenceSnapshot(await self.rules_of(user), None)
        decision = access.decide_read(snapshot.rules, user, requester, kind)
        if decision.verdict is Verdict.REFUSED:
            raise Forbidden(f"refused by {user}")
        if decision.verdict is Verdict.AUTHENTICATE:
            raise Unauthorized("authenticate (OSCORE) to see this presence")
        doc = snapshot.document or await self.store.get_presence(user) or PresenceDocument()
        if decision.verdict is Verdict.POLITELY_BLOCKED:
            return PresenceView(access.polite_view(doc), decision.verdict)
        return PresenceView(access.apply_view(doc, decision.view), decision.verdict)

    async def fetch_presence(self, user: UserId) -> PresenceDocument:
        """The stored document, unfiltered (for the gateway itself, not for requesters)."""
        await self._presentity(user)
        return await self.store.get_presence(user) or PresenceDocument()

    async def _authorize_publish(self, user: UserId, requester: Requester) -> None:
        self._require_principal(requester, "publish presence")
        if not access.may_publish(await self.rules_of(user), user, requester):
            raise Forbidden(f"not allowed to publish for {user}")

    async def publish_presence(
        self,
        user: UserId,
        published: PresenceDocument,
        requester: Requester,
        *,
        if_match: list[bytes] | None = None,
    ) -> PresenceDocument:
        await self._presentity(user)
        await self._authorize_publish(user, requester)
        async with self._presence_locks[user]:
            previous = await self.store.get_presence(user)
            current = previous or PresenceDocument()
            if (
                if_match is not None
                and presence.representation_etag(current, codec.encode_presence(current)) not in if_match
            ):
                raise PreconditionFailed("presence changed since that version")
            doc = presence.apply_publish(previous, published, self.now())
            await self.store.put_presence(user, doc, presence.lease_deadline(doc))
        self.listener.presence_changed(user)
        return doc

    async def withdraw_presence(self, user: UserId, requester: Requester) -> PresenceDocument:
        await self._presentity(user)
        await self._authorize_publish(user, requester)
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

    async def send_message(
        self, recipient: UserId, body: bytes, requester: Requester
    ) -> tuple[InstantMessage, EnqueueResult]:
        """Accept an IM durably. Immediate failures are answered by code: 4.01 anonymous,
        4.04 unknown recipient (or no inbox), 4.03 refused by the recipient's rules or a
        ``from`` that is not the authenticated sender, 4.13 too large; a later expiry
        shows in the sender's delivery records."""
        sender = self._require_principal(requester, "send instant messages")
        if not self.serves(recipient):
            return await self._send_elsewhere(sender, recipient, body)
        facts = await self._facts_admitting(sender, recipient)
        message = self._decode_from(sender, recipient, body)
        received = self.now()
        # Store the canonical encoding, so a resend compares equal whatever its key order.
        canonical = codec.encode_message(message)
        for _attempt in range(3):
            try:
                # Stored only if the facts still hold: none of a block, a removal or a
                # registration change is missed, even one in another process just now.
                result = await self.store.enqueue(
                    message, canonical, received, inbox.expires_at(message, received), expect=facts
                )
                break
            except FactsChanged:
                facts = await self._facts_admitting(sender, recipient, fresh=True)
        else:
            raise StoreUnavailable("registrations or rules kept changing; try again")
        if result.newly_stored:
            # The sender's records are not re-notified: the 2.01 just told it "queued".
            self.listener.inbox_changed(recipient)
        return message, result

    async def _send_elsewhere(
        self, sender: UserId, recipient: UserId, body: bytes
    ) -> tuple[InstantMessage, EnqueueResult]:
        """Federation: acknowledged once the recipient's gateway has stored it."""
        if self.serves(sender) and (await self.store.get_send_facts(sender, None)).sender is None:
            raise Forbidden(UNKNOWN_SENDER)
        message = self._decode_from(sender, recipient, body)
        if not self.serves(sender) or self.peers is None:
            raise NotFound("domain not served here")
        forwarded = codec.encode_message(message, include_from=False, compact=True)
        return message, EnqueueResult(await self.peers.send_message(sender, recipient, forwarded), True)

    @staticmethod
    def _decode_from(sender: UserId, recipient: UserId, body: bytes) -> InstantMessage:
        message = codec.decode_message(body, recipient, sender)
        if message.sender != sender:
            raise Forbidden("from must be the authenticated sender")
        return message

    async def _facts_admitting(self, sender: UserId, recipient: UserId, *, fresh: bool = False) -> SendFacts:
        """The facts an IM from ``sender`` to ``recipient`` (of a served domain) is
        accepted on: those of its last accepted IM if they still admit it (the store
        checks them as it stores: one round trip per IM), else fresh ones. A refusal
        always comes from fresh facts."""
        key = (sender, recipient)
        facts = None if fresh else self._recent_send_facts.get(key)
        if facts is not None and self._refusal(facts, sender, recipient) is None:
            return facts
        facts = await self.store.get_send_facts(sender, recipient)
        refusal = self._refusal(facts, sender, recipient)
        if refusal is not None:
            self._recent_send_facts.pop(key, None)
            raise refusal
        if len(self._recent_send_facts) >= RECENT_SEND_FACTS:
            self._recent_send_facts.pop(next(iter(self._recent_send_facts)))
        self._recent_send_facts[key] = facts
        return facts

    def _refusal(self, facts: SendFacts, sender: UserId, recipient: UserId) -> GatewayError | None:
        # A sender of another domain can only be one its gateway vouched for (federation).
        if self.serves(sender) and facts.sender is None:
            return Forbidden(UNKNOWN_SENDER)
        if (no_inbox := self._inbox_refusal(facts.recipient)) is not None:
            return no_inbox
        if not access.may_send(facts.recipient_rules or access.DEFAULT_RULES, recipient, sender):
            return Forbidden(f"refused by {recipient}")
        return None

    async def _authorize_inbox_read(self, user: UserId, requester: Requester) -> None:
        self._require_principal(requester, "read an inbox")
        if not access.may_read_inbox(await self.rules_of(user), user, requester):
            raise Forbidden(f"not allowed to read the inbox of {user}")

    async def fetch_inbox(
        self, user: UserId, requester: Requester, after: Seq, budget: int, *, for_notification: bool = False
    ) -> tuple[list[QueuedMessage], bool]:
        await self._inbox(user)
        await self._authorize_inbox_read(user, requester)
        queued = await self.store.pending(user, after, FETCH_LIMIT + 1)
        more_in_store = len(queued) > FETCH_LIMIT
        batch, more = inbox.fit_batch(queued[:FETCH_LIMIT], budget, at_least_one=not for_notification)
        return batch, more or more_in_store

    async def acknowledge(self, user: UserId, requester: Requester, upto: Seq) -> None:
        await self._inbox(user)
        await self._authorize_inbox_read(user, requester)
        senders = await self.store.acknowledge(user, upto, self.now())
        # An inbox observation signals new messages; removing some is no news to anyone.
        for sender in senders:
            self.listener.records_changed(sender)

    async def delivery_records(self, sender: UserId, requester: Requester) -> list[DeliveryRecord]:
        await self._known(sender, requester, "read delivery records")
        self._require_owner(sender, requester, "read these delivery records", admin_too=False)
        return await self.store.records(sender, RECORDS_LIMIT)

    # -- time-driven -----------------------------------------------------------------

    async def sweep(self) -> None:
        """Expire leases and message ttls that ran out by now."""
        now = self.now()
        for user in await self.store.due_leases(now):
            await self.mark_out_of_contact(user, only_if_expired=True)
        for sender, _recipient in await self.store.expire_messages(now):
            self.listener.records_changed(sender)
