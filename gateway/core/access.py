"""Theory of operation: access rules (RFC 2779 2.3, 5.1, 5.2, 5.4.11).

Each principal owns one rule set covering its presentity and its inbox. A requester
is a UserId (authenticated by OSCORE) or None (anonymous, unprotected request).
Patterns name requesters: ``user@domain`` exactly, ``*@domain`` a whole domain,
``*`` any authenticated principal, ``anonymous`` unauthenticated requesters.

Presence reads (fetch or subscribe) are decided in this order:
1. the owner sees everything (administrators are watchers like any other here);
2. ``refused`` matches: refused with notice (4.03, RFC 2779 5.1.5);
3. ``blocked`` matches: polite blocking (5.1.15): the request appears granted but the
   watcher only ever sees a CLOSED document carrying the real version, so its
   notifications keep the real cadence and the block cannot be told from a
   presentity that stays CLOSED;
4. the fetchers / subscribers list matches: granted, seen through the most specific
   matching view (2.3.3, 5.2.3: field filtering and a per-watcher note);
5. otherwise refused with notice; an anonymous requester is told to authenticate (4.01).

The rules hold whether or not the presentity is in contact: nothing here looks at
its presence (2.3 last paragraph).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum, IntFlag

from .ids import UserId, domain_of
from .model import Contact, PresenceDocument, Status

ANYONE = "*"
ANONYMOUS = "anonymous"
MAX_PATTERNS = 64


class Field(IntFlag):
    """Parts of a presence document a view may show (status is always shown)."""

    NOTE = 1
    TEL = 2
    EMAIL = 4
    URL = 8
    ADR = 16
    EXTENSIONS = 32
    ALL = 63


@dataclass(frozen=True, slots=True)
class View:
    fields: Field = Field.ALL
    note: str | None = None  # shown instead of the real note: different content per watcher


FULL_VIEW = View()


@dataclass(frozen=True, slots=True)
class AccessRules:
    fetchers: tuple[str, ...] = (ANYONE,)
    subscribers: tuple[str, ...] = (ANYONE,)
    publishers: tuple[UserId, ...] = ()  # others who may update the presence (2.3.4)
    refused: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    views: Mapping[str, View] = field(default_factory=dict)
    senders: tuple[str, ...] = (ANYONE,)  # who may send to the inbox (2.3.5)
    blocked_senders: tuple[str, ...] = ()  # 5.4.11
    readers: tuple[UserId, ...] = ()  # others who may read the inbox (2.3.6)


DEFAULT_RULES = AccessRules()


class Verdict(Enum):
    GRANTED = "granted"
    POLITELY_BLOCKED = "politely-blocked"
    REFUSED = "refused"  # 4.03 with notice
    AUTHENTICATE = "authenticate"  # anonymous, not allowed: 4.01


class ReadKind(IntEnum):
    FETCH = 0
    SUBSCRIBE = 1


@dataclass(frozen=True, slots=True)
class ReadDecision:
    verdict: Verdict
    view: View = FULL_VIEW


def matches(pattern: str, requester: UserId | None) -> bool:
    if requester is None:
        return pattern == ANONYMOUS
    if pattern == ANYONE:
        return True
    if pattern.startswith("*@"):
        return domain_of(requester) == pattern[2:]
    return pattern == requester


def _any(patterns: tuple[str, ...], requester: UserId | None) -> bool:
    return any(matches(p, requester) for p in patterns)


def _specificity(pattern: str) -> int:
    if pattern in (ANYONE, ANONYMOUS):
        return 1
    if pattern.startswith("*@"):
        return 2
    return 3


def view_for(rules: AccessRules, requester: UserId | None) -> View:
    best: tuple[int, View] = (0, FULL_VIEW)
    for pattern, view in rules.views.items():
        if matches(pattern, requester) and _specificity(pattern) > best[0]:
            best = (_specificity(pattern), view)
    return best[1]


def decide_read(rules: AccessRules, owner: UserId, requester: UserId | None, kind: ReadKind) -> ReadDecision:
    if requester == owner:
        return ReadDecision(Verdict.GRANTED)
    if _any(rules.refused, requester):
        return ReadDecision(Verdict.REFUSED)
    if _any(rules.blocked, requester):
        return ReadDecision(Verdict.POLITELY_BLOCKED)
    allowed = rules.subscribers if kind is ReadKind.SUBSCRIBE else rules.fetchers
    if _any(allowed, requester):
        return ReadDecision(Verdict.GRANTED, view_for(rules, requester))
    return ReadDecision(Verdict.AUTHENTICATE if requester is None else Verdict.REFUSED)


def may_publish(rules: AccessRules, owner: UserId, requester: UserId | None) -> bool:
    return requester is not None and (requester == owner or requester in rules.publishers)


def may_send(rules: AccessRules, owner: UserId, sender: UserId | None) -> bool:
    if sender is None:
        return False
    if sender == owner:
        return True
    return not _any(rules.blocked_senders, sender) and _any(rules.senders, sender)


def may_read_inbox(rules: AccessRules, owner: UserId, requester: UserId | None) -> bool:
    return requester is not None and (requester == owner or requester in rules.readers)


def apply_view(doc: PresenceDocument, view: View) -> PresenceDocument:
    if view == FULL_VIEW:
        return doc
    shown = view.fields
    contact = Contact(
        tel=doc.contact.tel if Field.TEL in shown else None,
        email=doc.contact.email if Field.EMAIL in shown else None,
        url=doc.contact.url if Field.URL in shown else None,
        adr=doc.contact.adr if Field.ADR in shown else None,
    )
    note = view.note if view.note is not None else (doc.note if Field.NOTE in shown else None)
    return replace(
        doc,
        note=note,
        contact=contact,
        extensions=doc.extensions if Field.EXTENSIONS in shown else {},
    )


def polite_view(doc: PresenceDocument) -> PresenceDocument:
    """What a politely blocked watcher sees: CLOSED, nothing else, real version and time."""
    return PresenceDocument(status=Status.CLOSED, timestamp=doc.timestamp, version=doc.version)
