"""The one codec boundary: CBOR bytes <-> domain model, with strict validation.

Wire keys are small integers (one CBOR byte each); ``docs/protocol.md`` lists them.
On untrusted input every decoder raises only :class:`CodecError` (4.00) or
:class:`PayloadTooLarge` (4.13), never anything else.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any

import cbor2

from . import access, subscriptions
from .errors import CodecError, GatewayError, PayloadTooLarge
from .ids import UserId, parse_domain, parse_user_id
from .model import (
    Contact,
    DeliveryRecord,
    DeliveryState,
    ExtValue,
    FailureReason,
    InstantMessage,
    MessageId,
    PresenceDocument,
    QueuedMessage,
    Seq,
    Status,
)

MAX_BODY = 4096  # any request body; larger is 4.13 before decoding
MAX_IM_PAYLOAD = 2048
MAX_MSG_ID = 16
MAX_NOTE = 256  # characters
MAX_CONTACT_FIELD = 128
MAX_EXT_ENTRIES = 16
MAX_EXT_BYTES = 512
MAX_LEASE = 7 * 24 * 3600
MAX_TTL = 30 * 24 * 3600
MAX_DEPTH = 8


class PresenceKey(IntEnum):
    STATUS = 0
    NOTE = 1
    CONTACT = 2
    EXTENSIONS = 3
    TIMESTAMP = 4  # set by the gateway
    VERSION = 5  # set by the gateway
    LEASE = 6
    OUT_OF_CONTACT = 7  # set by the gateway
    BASE = 8  # in a delta notification only: the version this patch applies to


class ContactKey(IntEnum):
    TEL = 0
    EMAIL = 1
    URL = 2
    ADR = 3


class MessageKey(IntEnum):
    ID = 0
    FROM = 1
    TO = 2
    REPLY_TO = 3
    CONTENT_FORMAT = 4
    PAYLOAD = 5
    CREATED = 6
    TTL = 7


class BatchKey(IntEnum):
    MESSAGES = 0  # array of [seq, message map]
    CURSOR = 1  # highest seq in this batch (ack up to it)
    MORE = 2  # true: more queued messages than fit


class RecordKey(IntEnum):
    ID = 0
    TO = 1
    STATE = 2
    REASON = 3
    UPDATED = 4


_GATEWAY_SET_PRESENCE_KEYS = {PresenceKey.TIMESTAMP, PresenceKey.VERSION, PresenceKey.OUT_OF_CONTACT}


def _loads(data: bytes) -> Any:
    if len(data) > MAX_BODY:
        raise PayloadTooLarge(f"body over {MAX_BODY} bytes")
    if not data:
        raise CodecError("empty body")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(stream, max_depth=MAX_DEPTH, allow_duplicate_keys=False)
        value = decoder.decode()
    except GatewayError:
        raise
    except Exception as exc:  # cbor2 raises several types on garbage; all mean one thing here
        raise CodecError("malformed CBOR") from exc
    if stream.tell() != len(data):
        raise CodecError("trailing bytes after CBOR item")
    return value


def _dumps(value: object) -> bytes:
    return cbor2.dumps(value)


def _map(value: Any, what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise CodecError(f"{what}: map expected")
    return value


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise CodecError(f"{what}: text expected")
    if len(value) > limit:
        raise CodecError(f"{what}: over {limit} characters")
    return value


def _uint(value: Any, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise CodecError(f"{what}: integer 0..{limit} expected")
    return value


def _user(value: Any, what: str) -> UserId:
    try:
        return parse_user_id(_text(value, what, 64))
    except CodecError:
        raise
    except GatewayError as exc:
        raise CodecError(f"{what}: {exc.diagnostic}") from exc


def _check_keys(body: Mapping[Any, Any], allowed: type[IntEnum], what: str) -> None:
    for key in body:
        if isinstance(key, bool) or not isinstance(key, int) or key not in allowed._value2member_map_:
            raise CodecError(f"{what}: unknown key {key!r}")


def _ext_value(value: Any, depth: int) -> ExtValue:
    if depth > MAX_DEPTH:
        raise CodecError("extensions: nested too deep")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not -(2**64) <= value < 2**64:
            raise CodecError("extensions: integer out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodecError("extensions: non-finite float")
        return value
    if isinstance(value, list):
        return [_ext_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {_ext_key(k): _ext_value(v, depth + 1) for k, v in value.items()}
    raise CodecError("extensions: unsupported CBOR type")


def _ext_key(key: Any) -> int | str:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise CodecError("extensions: keys must be integers or text")
    if isinstance(key, int) and not -(2**31) <= key < 2**31:
        raise CodecError("extensions: key out of range")
    return key


# -- presence -----------------------------------------------------------------------


def decode_contact(value: Any) -> Contact:
    body = _map(value, "contact")
    _check_keys(body, ContactKey, "contact")
    fields = {
        key.name.lower(): _text(body[key], f"contact {key.name.lower()}", MAX_CONTACT_FIELD)
        for key in ContactKey
        if key in body
    }
    return Contact(**fields)


def decode_presence(data: bytes) -> PresenceDocument:
    """Decode a published presence document (publisher's fields; gateway-set ones are ignored)."""
    body = _map(_loads(data), "presence")
    _check_keys(body, PresenceKey, "presence")
    if PresenceKey.BASE in body:
        raise CodecError("presence: key 8 (base) belongs to delta notifications only")
    if PresenceKey.STATUS not in body:
        raise CodecError("presence: status (key 0) is required")
    status_value = _uint(body[PresenceKey.STATUS], "status", 1)
    note = _text(body[PresenceKey.NOTE], "note", MAX_NOTE) if PresenceKey.NOTE in body else None
    contact = decode_contact(body[PresenceKey.CONTACT]) if PresenceKey.CONTACT in body else Contact()
    extensions: dict[int | str, ExtValue] = {}
    if PresenceKey.EXTENSIONS in body:
        raw_ext = _map(body[PresenceKey.EXTENSIONS], "extensions")
        if len(raw_ext) > MAX_EXT_ENTRIES:
            raise CodecError(f"extensions: over {MAX_EXT_ENTRIES} entries")
        extensions = {_ext_key(k): _ext_value(v, 1) for k, v in raw_ext.items()}
        if len(_dumps(extensions)) > MAX_EXT_BYTES:
            raise CodecError(f"extensions: over {MAX_EXT_BYTES} bytes")
    lease = _uint(body[PresenceKey.LEASE], "lease", MAX_LEASE) if PresenceKey.LEASE in body else None
    if lease == 0:
        raise CodecError("lease: must be at least 1 second")
    return PresenceDocument(
        status=Status(status_value),
        note=note,
        contact=contact,
        extensions=extensions,
        lease=lease,
    )


def decode_presence_view(data: bytes) -> PresenceDocument:
    """Decode a presence document as served by the gateway (watcher side)."""
    doc = decode_presence(data)
    body = _map(_loads(data), "presence")
    return PresenceDocument(
        status=doc.status,
        note=doc.note,
        contact=doc.contact,
        extensions=doc.extensions,
        lease=doc.lease,
        timestamp=_uint(body.get(PresenceKey.TIMESTAMP, 0), "timestamp", 2**63),
        version=_uint(body.get(PresenceKey.VERSION, 0), "version", 2**63),
        out_of_contact=bool(body.get(PresenceKey.OUT_OF_CONTACT, False)),
    )


def presence_patch(previous: bytes, current: bytes, base_version: int) -> bytes | None:
    """A delta notification taking a watcher from ``previous`` (the body it was last
    sent, of version ``base_version``) to ``current``: changed and new keys with their
    values, removed keys as null, and key 8 naming the base. None when the full
    document is no larger."""
    old, new = cbor2.loads(previous), cbor2.loads(current)
    patch: dict[int, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    patch[int(PresenceKey.BASE)] = base_version
    encoded = _dumps(patch)
    return encoded if len(encoded) < len(current) else None


def apply_presence_patch(current: PresenceDocument, data: bytes) -> PresenceDocument | None:
    """Watcher side: the document after a notification that may be a delta. None when
    it is a delta against a version the watcher does not have: fetch the whole document
    (a gap: a notification was lost or merged)."""
    body = _map(_loads(data), "presence")
    if PresenceKey.BASE not in body:
        return decode_presence_view(data)
    if body.pop(PresenceKey.BASE) != current.version:
        return None
    full = {k: v for k, v in _map(_loads(encode_presence(current)), "presence").items()}
    for key, value in body.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return decode_presence_view(_dumps(full))


def _contact_map(contact: Contact) -> dict[int, str]:
    return {key: value for key in ContactKey if (value := getattr(contact, key.name.lower())) is not None}


def encode_presence(doc: PresenceDocument, *, for_publish: bool = False) -> bytes:
    """Encode; ``for_publish`` leaves out the fields only the gateway sets."""
    body: dict[int, Any] = {PresenceKey.STATUS: int(doc.status)}
    if doc.note is not None:
        body[PresenceKey.NOTE] = doc.note
    contact = _contact_map(doc.contact)
    if contact:
        body[PresenceKey.CONTACT] = contact
    if doc.extensions:
        body[PresenceKey.EXTENSIONS] = dict(doc.extensions)
    if doc.lease is not None:
        body[PresenceKey.LEASE] = doc.lease
    if not for_publish:
        body[PresenceKey.TIMESTAMP] = doc.timestamp
        body[PresenceKey.VERSION] = doc.version
        if doc.out_of_contact:
            body[PresenceKey.OUT_OF_CONTACT] = True
    return _dumps({int(k): v for k, v in body.items()})


# -- instant messages ---------------------------------------------------------------


def decode_message(data: bytes, recipient: UserId | None = None, sender: UserId | None = None) -> InstantMessage:
    """Decode an IM POSTed to ``recipient``'s inbox.

    The path names the recipient (key 2 may repeat it) and OSCORE names the sender
    (key 1 may repeat it; the caller checks it matches)."""
    raw = _loads(data)
    body = _from_compact_message(raw) if isinstance(raw, list) else _map(raw, "message")
    _check_keys(body, MessageKey, "message")
    if MessageKey.FROM not in body and sender is None:
        raise CodecError("message: key 1 (from) is required")
    for required in (MessageKey.ID, MessageKey.PAYLOAD):
        if required not in body:
            raise CodecError(f"message: key {int(required)} ({required.name.lower()}) is required")
    msg_id = body[MessageKey.ID]
    if not isinstance(msg_id, bytes) or not 1 <= len(msg_id) <= MAX_MSG_ID:
        raise CodecError(f"message id: 1..{MAX_MSG_ID} bytes expected")
    payload = body[MessageKey.PAYLOAD]
    if not isinstance(payload, bytes):
        raise CodecError("payload: byte string expected")
    if len(payload) > MAX_IM_PAYLOAD:
        raise PayloadTooLarge(f"payload over {MAX_IM_PAYLOAD} bytes")
    to = _user(body[MessageKey.TO], "to") if MessageKey.TO in body else recipient
    if to is None:
        raise CodecError("message: recipient (key 2) is required")
    if recipient is not None and to != recipient:
        raise CodecError("message: recipient differs from the inbox addressed")
    return InstantMessage(
        msg_id=MessageId(msg_id),
        sender=_user(body[MessageKey.FROM], "from") if MessageKey.FROM in body else sender,  # type: ignore[arg-type]
        recipient=to,
        payload=payload,
        content_format=_uint(body.get(MessageKey.CONTENT_FORMAT, 0), "content format", 65535),
        reply_to=_user(body[MessageKey.REPLY_TO], "reply-to") if MessageKey.REPLY_TO in body else None,
        created=_uint(body[MessageKey.CREATED], "created", 2**63) if MessageKey.CREATED in body else None,
        ttl=_uint(body[MessageKey.TTL], "ttl", MAX_TTL) if MessageKey.TTL in body else None,
    )


def _from_compact_message(raw: list[Any]) -> dict[Any, Any]:
    """The compact form of a POSTed message, ``[id, payload]``: the map without its two
    key bytes, for the common message that has nothing else (docs/protocol.md 3.1)."""
    if len(raw) != 2:
        raise CodecError("message: compact form is [id, payload]")
    return {MessageKey.ID: raw[0], MessageKey.PAYLOAD: raw[1]}


def _message_map(msg: InstantMessage, *, include_to: bool, include_from: bool = True) -> dict[int, Any]:
    body: dict[int, Any] = {MessageKey.ID: bytes(msg.msg_id)}
    if include_from:
        body[MessageKey.FROM] = msg.sender
    body[MessageKey.PAYLOAD] = msg.payload
    if include_to:
        body[MessageKey.TO] = msg.recipient
    if msg.reply_to is not None:
        body[MessageKey.REPLY_TO] = msg.reply_to
    if msg.content_format:
        body[MessageKey.CONTENT_FORMAT] = msg.content_format
    if msg.created is not None:
        body[MessageKey.CREATED] = msg.created
    if msg.ttl is not None:
        body[MessageKey.TTL] = msg.ttl
    return {int(k): v for k, v in body.items()}


def encode_message(
    msg: InstantMessage, *, include_to: bool = False, include_from: bool = True, compact: bool = False
) -> bytes:
    """Encode for POSTing to the recipient's inbox (the path already names the recipient;
    over OSCORE the security context names the sender, so ``include_from`` may be off).
    ``compact``: the array form ``[id, payload]`` when the message has nothing else."""
    body = _message_map(msg, include_to=include_to, include_from=include_from)
    if compact and body.keys() == {int(MessageKey.ID), int(MessageKey.PAYLOAD)}:
        return _dumps([body[MessageKey.ID], body[MessageKey.PAYLOAD]])
    return _dumps(body)


# -- contacts: the principal's numbered list, for short paths ----------------------------

MAX_CONTACTS = 255  # aliases 1..255: at most three digits in a path


def encode_contacts(contacts: Sequence[UserId]) -> bytes:
    return _dumps(list(contacts))


def decode_contacts(data: bytes) -> tuple[UserId, ...]:
    """A CBOR array of identifiers; contact n (the alias ``n`` in paths) is entry n-1."""
    value = _loads(data)
    if not isinstance(value, list) or len(value) > MAX_CONTACTS:
        raise CodecError(f"contacts: array of at most {MAX_CONTACTS} identifiers expected")
    return tuple(_user(v, "contact") for v in value)


def encode_batch(
    messages: Sequence[QueuedMessage],
    more: bool,
    aliases: Mapping[UserId, int] | None = None,
    *,
    terse: bool = True,
) -> bytes:
    """An inbox batch. ``terse`` (docs/protocol.md 3.3) leaves out what the reader can
    infer: the cursor (the last message's seq), ``more`` when false, and then the map
    around the items; an item whose message has nothing but id, sender and payload is
    ``[seq, id, from, payload]``. With ``aliases`` (the reader's contact numbers, asked
    for with ``?a``) a sender among them is written as its number, not ``user@domain``."""
    cursor = messages[-1].seq if messages else 0
    items: list[list[Any]] = []
    for m in messages:
        body = _message_map(m.message, include_to=False)
        if aliases and m.message.sender in aliases:
            body[MessageKey.FROM] = aliases[m.message.sender]
        if terse and body.keys() == {int(MessageKey.ID), int(MessageKey.FROM), int(MessageKey.PAYLOAD)}:
            items.append([m.seq, body[MessageKey.ID], body[MessageKey.FROM], body[MessageKey.PAYLOAD]])
        else:
            items.append([m.seq, body])
    if terse and not more:
        return _dumps(items)
    batch: dict[int, Any] = {int(BatchKey.MESSAGES): items}
    if not terse:
        batch[int(BatchKey.CURSOR)] = cursor
    batch[int(BatchKey.MORE)] = more
    return _dumps(batch)


def _by_contact_number(value: Any, contacts: Sequence[UserId], what: str) -> UserId:
    """A user written as the reader's contact number (1-based), or in full."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= len(contacts):
            raise CodecError(f"{what}: contact {value} unknown here (re-read /c)")
        return contacts[value - 1]
    return _user(value, what)


def batch_size_of(message: QueuedMessage) -> int:
    """Bytes one queued message adds to an encoded batch (for fitting notifications)."""
    return len(_dumps([message.seq, _message_map(message.message, include_to=False)]))


def decode_batch(
    data: bytes, recipient: UserId, contacts: Sequence[UserId] = ()
) -> tuple[list[QueuedMessage], int, bool]:
    """Client side: decode an inbox batch into (messages, cursor, more); ``contacts``
    resolves senders written as contact numbers."""
    value = _loads(data)
    body = {BatchKey.MESSAGES: value} if isinstance(value, list) else _map(value, "batch")
    _check_keys(body, BatchKey, "batch")
    raw = body.get(BatchKey.MESSAGES, [])
    if not isinstance(raw, list):
        raise CodecError("batch: array expected")
    out = []
    for item in raw:
        if isinstance(item, list) and len(item) == 4:  # [seq, id, from, payload]
            item = [item[0], {MessageKey.ID: item[1], MessageKey.FROM: item[2], MessageKey.PAYLOAD: item[3]}]
        if not isinstance(item, list) or len(item) != 2:
            raise CodecError("batch item: [seq, message] or [seq, id, from, payload] expected")
        seq = _uint(item[0], "seq", 2**63)
        fields = _map(item[1], "message")
        if MessageKey.FROM in fields:
            fields = {**fields, MessageKey.FROM: _by_contact_number(fields[MessageKey.FROM], contacts, "from")}
        msg = decode_message(_dumps(fields), recipient)
        out.append(QueuedMessage(seq=Seq(seq), message=msg, received=0))
    cursor = _uint(body.get(BatchKey.CURSOR, out[-1].seq if out else 0), "cursor", 2**63)
    more = body.get(BatchKey.MORE, False)
    if not isinstance(more, bool):
        raise CodecError("batch: more must be a boolean")
    return out, cursor, more


# -- delivery records ---------------------------------------------------------------


def encode_records(records: Sequence[DeliveryRecord], aliases: Mapping[UserId, int] | None = None) -> bytes:
    """Delivery records; with ``aliases`` a recipient among the sender's contacts is
    written as its contact number."""
    aliases = aliases or {}
    return _dumps(
        [
            {
                int(RecordKey.ID): bytes(r.msg_id),
                int(RecordKey.TO): aliases.get(r.recipient, r.recipient),
                int(RecordKey.STATE): int(r.state),
                **({int(RecordKey.REASON): int(r.reason)} if r.reason else {}),
                int(RecordKey.UPDATED): r.updated,
            }
            for r in records
        ]
    )


def decode_records(data: bytes, contacts: Sequence[UserId] = ()) -> list[DeliveryRecord]:
    raw = _loads(data)
    if not isinstance(raw, list):
        raise CodecError("records: array expected")
    out = []
    for item in raw:
        body = _map(item, "record")
        _check_keys(body, RecordKey, "record")
        msg_id = body.get(RecordKey.ID)
        if not isinstance(msg_id, bytes):
            raise CodecError("record id: bytes expected")
        try:
            state = DeliveryState(_uint(body.get(RecordKey.STATE), "state", 2))
            reason = FailureReason(_uint(body.get(RecordKey.REASON, 0), "reason", 4))
        except ValueError as exc:
            raise CodecError("record: bad state") from exc
        out.append(
            DeliveryRecord(
                msg_id=MessageId(msg_id),
                recipient=_by_contact_number(body.get(RecordKey.TO), contacts, "to"),
                state=state,
                reason=reason,
                updated=_uint(body.get(RecordKey.UPDATED, 0), "updated", 2**63),
            )
        )
    return out


def dumps_seq(seq: int) -> bytes:
    """Body of a 2.01 answer to an IM POST: the message's sequence number."""
    return _dumps(seq)


def decode_seq(data: bytes) -> int:
    return _uint(_loads(data), "seq", 2**63)


# -- access rules -------------------------------------------------------------------


class RulesKey(IntEnum):
    FETCHERS = 0
    SUBSCRIBERS = 1
    PUBLISHERS = 2
    REFUSED = 3
    BLOCKED = 4
    VIEWS = 5
    SENDERS = 6
    BLOCKED_SENDERS = 7
    READERS = 8


class ViewKey(IntEnum):
    FIELDS = 0
    NOTE = 1


def _pattern(value: Any) -> str:
    text = _text(value, "pattern", 64)
    if text in (access.ANYONE, access.ANONYMOUS):
        return text
    try:
        if text.startswith("*@"):
            return "*@" + parse_domain(text[2:])
        return parse_user_id(text)
    except GatewayError as exc:
        raise CodecError(f"pattern {text!r}: {exc.diagnostic}") from exc


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > access.MAX_PATTERNS:
        raise CodecError(f"{what}: array of at most {access.MAX_PATTERNS} patterns expected")
    return tuple(_pattern(v) for v in value)


def _users(value: Any, what: str) -> tuple[UserId, ...]:
    if not isinstance(value, list) or len(value) > access.MAX_PATTERNS:
        raise CodecError(f"{what}: array of at most {access.MAX_PATTERNS} identifiers expected")
    return tuple(_user(v, what) for v in value)


def decode_rules(data: bytes) -> access.AccessRules:
    """Decode a rule set; keys left out keep their defaults."""
    body = _map(_loads(data), "rules")
    _check_keys(body, RulesKey, "rules")
    defaults = access.DEFAULT_RULES
    views: dict[str, access.View] = {}
    raw_views = _map(body.get(RulesKey.VIEWS, {}), "views")
    if len(raw_views) > access.MAX_PATTERNS:
        raise CodecError("views: too many")
    for pattern, raw in raw_views.items():
        view = _map(raw, "view")
        _check_keys(view, ViewKey, "view")
        fields = _uint(view.get(ViewKey.FIELDS, int(access.Field.ALL)), "view fields", int(access.Field.ALL))
        note = _text(view[ViewKey.NOTE], "view note", MAX_NOTE) if ViewKey.NOTE in view else None
        views[_pattern(pattern)] = access.View(access.Field(fields), note)

    def patterns(key: RulesKey, default: tuple[str, ...]) -> tuple[str, ...]:
        return _patterns(body[key], key.name.lower()) if key in body else default

    def users(key: RulesKey, default: tuple[UserId, ...]) -> tuple[UserId, ...]:
        return _users(body[key], key.name.lower()) if key in body else default

    return access.AccessRules(
        fetchers=patterns(RulesKey.FETCHERS, defaults.fetchers),
        subscribers=patterns(RulesKey.SUBSCRIBERS, defaults.subscribers),
        publishers=users(RulesKey.PUBLISHERS, defaults.publishers),
        refused=patterns(RulesKey.REFUSED, defaults.refused),
        blocked=patterns(RulesKey.BLOCKED, defaults.blocked),
        views=views,
        senders=patterns(RulesKey.SENDERS, defaults.senders),
        blocked_senders=patterns(RulesKey.BLOCKED_SENDERS, defaults.blocked_senders),
        readers=users(RulesKey.READERS, defaults.readers),
    )


def encode_rules(rules: access.AccessRules) -> bytes:
    views = {
        pattern: {
            int(ViewKey.FIELDS): int(view.fields),
            **({int(ViewKey.NOTE): view.note} if view.note is not None else {}),
        }
        for pattern, view in rules.views.items()
    }
    return _dumps(
        {
            int(RulesKey.FETCHERS): list(rules.fetchers),
            int(RulesKey.SUBSCRIBERS): list(rules.subscribers),
            int(RulesKey.PUBLISHERS): list(rules.publishers),
            int(RulesKey.REFUSED): list(rules.refused),
            int(RulesKey.BLOCKED): list(rules.blocked),
            int(RulesKey.VIEWS): views,
            int(RulesKey.SENDERS): list(rules.senders),
            int(RulesKey.BLOCKED_SENDERS): list(rules.blocked_senders),
            int(RulesKey.READERS): list(rules.readers),
        }
    )


# -- subscriptions, watchers and key bundles ----------------------------------------------


def encode_watchers(watchers: Sequence[subscriptions.Subscription]) -> bytes:
    """The presentity's view: [[watcher or "anonymous", politely blocked, since], ...]."""
    return _dumps([[w.watcher or access.ANONYMOUS, w.politely_blocked, w.since] for w in watchers])


def decode_watchers(data: bytes, presentity: UserId) -> list[subscriptions.Subscription]:
    raw = _loads(data)
    if not isinstance(raw, list):
        raise CodecError("watchers: array expected")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[1], bool):
            raise CodecError("watcher: [id, blocked, since] expected")
        watcher = None if item[0] == access.ANONYMOUS else _user(item[0], "watcher")
        out.append(subscriptions.Subscription(watcher, presentity, _uint(item[2], "since", 2**63), item[1]))
    return out


def encode_subscriptions(items: Sequence[subscriptions.SubscriptionStatus]) -> bytes:
    """The watcher's view: [[presentity, state, time], ...]."""
    return _dumps([[s.presentity, int(s.state), s.since] for s in items])


def decode_subscriptions(data: bytes) -> list[subscriptions.SubscriptionStatus]:
    raw = _loads(data)
    if not isinstance(raw, list):
        raise CodecError("subscriptions: array expected")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            raise CodecError("subscription: [presentity, state, time] expected")
        try:
            state = subscriptions.SubscriptionState(_uint(item[1], "state", 3))
        except ValueError as exc:
            raise CodecError("subscription: bad state") from exc
        out.append(subscriptions.SubscriptionStatus(_user(item[0], "presentity"), state, _uint(item[2], "time", 2**63)))
    return out


# -- fan-in between gateways (docs/protocol.md 1.4) -----------------------------------------

MAX_FAN_IN = 64  # watchers per shared observation: the answer must fit one notification
FAN_IN_REFUSED = -1  # this watcher may not see the presentity (its rules)
FAN_IN_CANCELLED = -2  # the presentity (or an administrator) cancelled this watcher


def encode_watcher_list(watchers: Sequence[UserId]) -> bytes:
    return _dumps(list(watchers))


def decode_watcher_list(data: bytes) -> tuple[UserId, ...]:
    value = _loads(data)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_FAN_IN:
        raise CodecError(f"watchers: array of 1..{MAX_FAN_IN} identifiers expected")
    watchers = tuple(_user(v, "watcher") for v in value)
    if len(set(watchers)) != len(watchers):
        raise CodecError("watchers: each at most once")
    return watchers


def encode_fan_in(views: Sequence[bytes], of: Sequence[int]) -> bytes:
    """Each distinct view once (encoded presence documents, as bytes), and for each
    watcher of the request, in its order, the index of its view or a negative verdict."""
    return _dumps([list(views), list(of)])


def decode_fan_in(data: bytes, watchers: int) -> tuple[list[bytes], list[int]]:
    value = _loads(data)
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list) and isinstance(value[1], list)):
        raise CodecError("fan-in: [views, of] expected")
    views, of = value
    if not all(isinstance(v, bytes) for v in views) or len(of) != watchers:
        raise CodecError("fan-in: views must be bytes, one entry per watcher")
    for index in of:
        if isinstance(index, bool) or not isinstance(index, int) or not FAN_IN_CANCELLED <= index < len(views):
            raise CodecError("fan-in: bad view index")
    return views, of
