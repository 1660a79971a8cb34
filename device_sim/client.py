"""A device's side of the protocol: a thin, typed client over aiocoap.

aiocoap 0.4.17 requests have no timeout (#396), so every request here is wrapped in
``asyncio.wait_for``. Resending an IM reuses its message id: the gateway stores it
once (exactly once), so a device may retry freely after a lost response.

CoAP transmission parameters (ACK_TIMEOUT, ACK_RANDOM_FACTOR, MAX_RETRANSMIT) are
aiocoap's global defaults unless a client is given a ``tuning`` (see
:func:`transport_tuning`): it is then set on every request this client sends
(aiocoap's per-message ``transport_tuning=``; the global values, which incoming
messages and a server in the same process use, are left alone).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message
from aiocoap.numbers.constants import TransportTuning
from aiocoap.oscore import NotAProtectedMessage
from aiocoap.proxy.client import ProxyForwarder

from gateway.coap import observe_cancel, oscore_outer
from gateway.coap.notification_order import fresh_notifications, remember_partial_ivs
from gateway.core import codec
from gateway.core.access import ANONYMOUS, AccessRules
from gateway.core.compression import Dictionary, DictionaryRegistry
from gateway.core.ids import UserId, domain_of, parse_address
from gateway.core.model import (
    DeliveryRecord,
    InstantMessage,
    MessageId,
    PresenceDocument,
    QueuedMessage,
)
from gateway.core.subscriptions import Subscription, SubscriptionStatus

DEFAULT_TIMEOUT = 30.0


def transport_tuning(ack_timeout: float, max_retransmit: int, ack_random_factor: float = 1.5) -> TransportTuning:
    """A per-message CoAP tuning (RFC 7252 4.8) for :class:`DeviceClient`'s ``tuning``.

    aiocoap derives MAX_TRANSMIT_SPAN / MAX_TRANSMIT_WAIT / EXCHANGE_LIFETIME from these."""
    if not (ack_timeout > 0 and ack_random_factor >= 1.0 and max_retransmit >= 0):
        raise ValueError("need ack_timeout > 0, ack_random_factor >= 1 and max_retransmit >= 0")
    tuning = TransportTuning()
    tuning.ACK_TIMEOUT = float(ack_timeout)
    tuning.ACK_RANDOM_FACTOR = float(ack_random_factor)
    tuning.MAX_RETRANSMIT = int(max_retransmit)
    return tuning


# aiocoap numbers an OSCORE request when it is made, then queues it behind the ones
# already outstanding to that peer (NSTART 1): with hundreds at once the later numbers
# overtake earlier ones by more than the gateway's replay window (32), which answers
# "Replay detected". Federation limits itself the same way (PEER_CONCURRENCY).
MAX_IN_FLIGHT = 16


class RequestFailed(Exception):
    def __init__(self, code: Code, diagnostic: str) -> None:
        super().__init__(f"{code}: {diagnostic}")
        self.code = code
        self.diagnostic = diagnostic


@dataclass
class InboxBatch:
    messages: list[QueuedMessage]
    cursor: int
    more: bool


def random_message_id() -> MessageId:
    # 8 random bytes: collisions (which would be refused as 4.09) stay negligible for
    # billions of messages per sender, with no state to keep on the device.
    return MessageId(os.urandom(8))


class MessageIdCounter:
    """Message ids from a per-device counter, in as few bytes as the count needs: 1 byte
    for the first 255 messages, 2 up to 65,535, 3 up to 16.7 million (8 random bytes
    otherwise). The gateway keeps one message per (sender, id) forever, so the counter
    must never go back: with a ``state_file`` blocks of ids are reserved on disk before
    they are used, so a crash or reboot skips at most a block and never repeats an id."""

    BLOCK = 64

    def __init__(self, state_file: Path | None = None, start: int = 1) -> None:
        if start < 0:
            raise ValueError("start >= 0")
        self.state_file = state_file
        self.next = start
        self.reserved_until = start
        if state_file is not None and state_file.exists():
            self.next = self.reserved_until = max(start, int(state_file.read_text()))

    def __call__(self) -> MessageId:
        if self.state_file is not None and self.next >= self.reserved_until:
            self.reserved_until = self.next + self.BLOCK
            self._write(self.reserved_until)
        value = self.next
        self.next += 1
        return MessageId(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))

    def _write(self, value: int) -> None:
        assert self.state_file is not None
        fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".msgid-")
        with os.fdopen(fd, "w") as f:
            f.write(str(value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)


class ShortTokens:
    """1-byte tokens (RFC 7252 allows 0 to 8) instead of aiocoap's 2 to 8: one byte less
    in every request and response. A token still in use by an outstanding request or
    observation to the same gateway is skipped. Only with OSCORE: tokens this short are
    guessable, and OSCORE (not the token) is what binds a response to its request
    (RFC 8613 section 12.1)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.fallback = manager.next_token
        self.last = 0

    def __call__(self) -> bytes:
        in_use = {token for token, _remote in self.manager.outgoing_requests}
        for _ in range(255):
            self.last = self.last % 255 + 1
            token = bytes([self.last])
            if token not in in_use:
                return token
        return bytes(self.fallback())

    @classmethod
    def install(cls, context: aiocoap.Context) -> int:
        installed = 0
        for interface in context.request_interfaces:
            if hasattr(interface, "outgoing_requests") and hasattr(interface, "next_token"):
                interface.next_token = cls(interface)
                installed += 1
        return installed


class DeviceClient:
    def __init__(
        self,
        context: aiocoap.Context,
        gateway: str,
        user: UserId,
        timeout: float = DEFAULT_TIMEOUT,
        tuning: TransportTuning | None = None,
        compact: bool = False,
        message_ids: Callable[[], MessageId] = random_message_id,
    ):
        self.context = context
        self.base = gateway.rstrip("/")
        self.user = user
        self.timeout = timeout
        self.tuning = tuning
        # Short paths (/p for its own presence, /i/3 for contact 3, /i/bob in its own
        # domain) and the compact IM form: see docs/protocol.md 1.2.
        self.compact = compact
        self.message_ids = message_ids
        self.contact_list: tuple[UserId, ...] = ()  # the principal's /c, once set or read
        self.aliases: dict[UserId, int] = {}
        self._closed = False
        self.dictionaries: DictionaryRegistry | None = None
        self._refused: set[str] = set()  # message classes the gateway has no dictionary for
        self.resyncs = 0  # delta notifications that did not apply (gaps): whole document fetched
        self.requester: Any = context  # the context itself, or a ProxyForwarder around it
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.replayed_notifications = 0  # dropped: not newer than one already seen

    @classmethod
    async def create(
        cls,
        gateway: str,
        user: UserId,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: Path | dict[str, Any] | None = None,
        tuning: TransportTuning | None = None,
        proxy: str | None = None,
        compact: bool | None = None,
        message_ids: Callable[[], MessageId] = random_message_id,
    ) -> DeviceClient:
        """A device of ``user``; with ``credentials`` (a credentials JSON file as written
        by ``python -m gateway provision``, or its content) every request is OSCORE
        protected, otherwise the device is anonymous. ``tuning`` (optional) sets the
        CoAP transmission parameters of this client's requests. ``proxy`` (a URI such
        as ``coap://127.0.0.1:5690``) sends every request through a CoAP forward proxy;
        OSCORE stays end to end between device and gateway. The gateway URI may use
        ``coap+tcp://`` or ``coap+ws://`` where UDP is blocked. ``compact`` (default:
        with credentials) uses short paths, the compact IM form and 1-byte tokens;
        ``message_ids`` makes the ids of sent IMs (a :class:`MessageIdCounter` for
        short ones)."""
        observe_cancel.install()  # so that a cancelled watch ends at the gateway too
        oscore_outer.install()  # so that a forward proxy can route a protected request
        context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6", "tcpclient", "ws"])
        if credentials is not None:
            data = json.loads(Path(credentials).read_text()) if isinstance(credentials, Path) else credentials
            context.client_credentials.load_from_dict(data)
            remember_partial_ivs(context.client_credentials)
        compact = credentials is not None if compact is None else compact
        if compact and credentials is not None:
            ShortTokens.install(context)
        client = cls(context, gateway, user, timeout, tuning, compact, message_ids)
        if proxy is not None:
            client.requester = ProxyForwarder(proxy, context)
        return client

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.context.shutdown()

    def message(self, **fields: Any) -> Message:
        """A request Message carrying this client's transmission tuning, if it has one."""
        if self.tuning is not None:
            fields.setdefault("transport_tuning", self.tuning)
        return Message(**fields)

    async def request(self, code: Code, path: str, payload: bytes = b"", **options: object) -> Message:
        # No Content-Format option for plain CBOR: the gateway takes its absence as CBOR
        # (60), and the option would cost 2 bytes in every request.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            msg = self.message(code=code, uri=self.base + path, payload=payload, **options)
            try:
                _, response = await self._first_response(msg, max(0.0, deadline - loop.time()))
                return response
            except NotAProtectedMessage as exc:
                # An unprotected answer to a protected request: only an error the gateway
                # could not protect, such as 5.03 while our context moves between its
                # processes (gateway/coap/handoff.py). Retry that one after its Max-Age.
                plain = exc.plain_message
                wait = plain.opt.max_age if plain.opt.max_age is not None else 60
                if plain.code != Code.SERVICE_UNAVAILABLE or loop.time() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)

    def _fresh(self, observation: Any) -> AsyncIterator[Message]:
        """Without replayed notifications (gateway/coap/notification_order.py)."""

        def replayed() -> None:
            self.replayed_notifications += 1

        return fresh_notifications(observation, replayed)

    async def _first_response(self, msg: Message, timeout: float) -> tuple[Any, Message]:
        """Send ``msg`` and wait for its (first) response, with at most MAX_IN_FLIGHT
        requests of this device outstanding (see MAX_IN_FLIGHT)."""
        async with self._in_flight:
            request = self.requester.request(msg)
            response: Message = await asyncio.wait_for(request.response, timeout)
            return request, response

    def at(self, user: UserId | None = None) -> str:
        """The path suffix naming ``user`` (default: this device's principal): the full
        ``/user@domain``, or when compact the shortest form the gateway resolves the
        same way: nothing for the principal itself, ``/3`` for its contact 3,
        ``/bob`` in its own domain."""
        if not self.compact:
            return f"/{user or self.user}"
        if user is None or user == self.user:
            return ""
        alias = self.aliases.get(user)
        if alias is not None:
            return f"/{alias}"
        local, _, domain = user.partition("@")
        if domain == domain_of(self.user) and parse_address([local]).local == local:
            return f"/{local}"
        return f"/{user}"

    async def set_contacts(self, contacts: list[UserId]) -> None:
        """Store the numbered contact list (``/c``): contact n is then addressed as ``/n``."""
        await self._ok(Code.PUT, f"/c{self.at()}", codec.encode_contacts(contacts))
        self._use_contacts(tuple(contacts))

    async def contacts(self) -> tuple[UserId, ...]:
        """Read the numbered contact list (``/c``); when compact, use it from now on (a
        device that restarts, or another device of the same principal)."""
        contacts = codec.decode_contacts(bytes((await self._ok(Code.GET, f"/c{self.at()}")).payload))
        if self.compact:
            self._use_contacts(contacts)
        return contacts

    def _use_contacts(self, contacts: tuple[UserId, ...]) -> None:
        self.contact_list = contacts
        self.aliases = {user: n for n, user in enumerate(contacts, start=1)}

    def _names_by_number(self) -> bool:
        """Ask (``?a``) that bodies name the principal's contacts by number."""
        return self.compact and bool(self.contact_list)

    async def _ok(self, code: Code, path: str, payload: bytes = b"", **options: object) -> Message:
        response = await self.request(code, path, payload, **options)
        if not response.code.is_successful():
            raise RequestFailed(response.code, response.payload.decode("utf-8", "replace"))
        return response

    # compression with trained dictionaries -------------------------------------------

    def enable_compression(self, registry: DictionaryRegistry) -> None:
        """Send bodies compressed with the newest dictionary of their class when that is
        smaller, and ask for compressed responses; falls back to plain CBOR for good if
        the gateway lacks the dictionary (4.15 / 4.06)."""
        self.dictionaries = registry

    def _dictionary(self, message_class: str) -> Dictionary | None:
        if self.dictionaries is None or message_class in self._refused:
            return None
        return self.dictionaries.newest_for(message_class)

    def _unpack(self, response: Message) -> bytes:
        if self.dictionaries is None:
            return bytes(response.payload)
        return self.dictionaries.decode_body(bytes(response.payload), response.opt.content_format, 1 << 16)

    async def _compressed(self, message_class: str, code: Code, path: str, cbor: bytes = b"") -> Message:
        """A request whose body and response may be compressed, with one plain retry."""
        options: dict[str, object] = {}
        payload = cbor
        dictionary = self._dictionary(message_class)
        if dictionary is not None:
            options["accept"] = dictionary.content_format
            packed = dictionary.compress(cbor) if cbor else b""
            if cbor and len(packed) < len(cbor):
                payload, options["content_format"] = packed, dictionary.content_format
        response = await self.request(code, path, payload, **options)
        if response.code in (Code.UNSUPPORTED_CONTENT_FORMAT, Code.NOT_ACCEPTABLE) and options:
            self._refused.add(message_class)
            response = await self.request(code, path, cbor)
        if not response.code.is_successful():
            raise RequestFailed(response.code, response.payload.decode("utf-8", "replace"))
        return response

    # presence ------------------------------------------------------------------------

    async def publish(self, doc: PresenceDocument) -> bytes:
        body = codec.encode_presence(doc, for_publish=True)
        response = await self._compressed("presence", Code.PUT, f"/p{self.at()}", body)
        return bytes(response.opt.etag or b"")

    async def withdraw(self) -> None:
        await self._ok(Code.DELETE, f"/p{self.at()}")

    async def fetch_presence(self, presentity: UserId) -> PresenceDocument:
        response = await self._compressed("presence", Code.GET, f"/p{self.at(presentity)}")
        return codec.decode_presence_view(self._unpack(response))

    async def watch(
        self, presentity: UserId, *, delta: bool = False, non: bool = False
    ) -> AsyncIterator[PresenceDocument]:
        """Subscribe (Observe) to a presentity: yields the current document, then every change.

        With ``delta`` the gateway may send a change as a patch against the last version
        it sent; after a gap (a lost or merged notification) the patch does not apply
        and the whole document is fetched again. With ``non`` notifications come as NON
        messages with a periodic CON (for lossy, slow links)."""
        flags = [flag for flag, on in (("d", delta), ("n", non)) if on]
        query = "?" + "&".join(flags) if flags else ""
        request, first = await self._first_response(
            self.message(code=Code.GET, uri=f"{self.base}/p{self.at(presentity)}{query}", observe=0), self.timeout
        )
        if not first.code.is_successful():
            raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
        current = codec.decode_presence_view(self._unpack(first))
        yield current
        try:
            async for notification in self._fresh(request.observation):
                if not notification.code.is_successful():
                    continue
                updated = codec.apply_presence_patch(current, self._unpack(notification))
                if updated is None:
                    self.resyncs += 1
                    updated = await self.fetch_presence(presentity)
                current = updated
                yield current
        finally:
            if not request.observation.cancelled:  # an error notification already ended it
                request.observation.cancel()

    # instant messages --------------------------------------------------------------

    new_message_id = staticmethod(random_message_id)

    async def send(
        self, recipient: UserId, text: str | bytes, msg_id: MessageId | None = None, **fields: object
    ) -> int:
        """Send an IM; returns its sequence number in the recipient's inbox."""
        payload = text.encode("utf-8") if isinstance(text, str) else text
        message = InstantMessage(
            msg_id=msg_id or self.message_ids(),
            sender=self.user,
            recipient=recipient,
            payload=payload,
            **fields,  # type: ignore[arg-type]
        )
        # OSCORE names the sender: "from" need not travel.
        body = codec.encode_message(message, include_from=False, compact=self.compact)
        response = await self._compressed("im", Code.POST, f"/i{self.at(recipient)}", body)
        return codec.decode_seq(self._unpack(response))

    async def fetch_inbox(self, after: int = 0) -> InboxBatch:
        flag = "&a" if self._names_by_number() else ""
        response = await self._compressed("im", Code.GET, f"/i{self.at()}?c={after}{flag}")
        messages, cursor, more = codec.decode_batch(self._unpack(response), self.user, self.contact_list)
        return InboxBatch(messages, cursor, more)

    async def acknowledge(self, upto: int) -> None:
        await self._ok(Code.DELETE, f"/i{self.at()}?c={upto}")

    async def watch_inbox(self) -> AsyncIterator[InboxBatch]:
        """Observe the own inbox: yields new queued messages now and at every change.

        Each notification shows the queue head as it is (it may repeat messages not yet
        acknowledged), so messages at or below the highest seq already yielded are
        dropped here: the application sees each message once. When a notification
        says ``more``, the rest is fetched with the cursor."""
        flag = "?a" if self._names_by_number() else ""
        request, first = await self._first_response(
            self.message(code=Code.GET, uri=f"{self.base}/i{self.at()}{flag}", observe=0), self.timeout
        )
        if not first.code.is_successful():
            raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
        handled = 0

        async def fresh(payload: bytes) -> InboxBatch:
            nonlocal handled
            batch = InboxBatch(*codec.decode_batch(payload, self.user, self.contact_list))
            new = [m for m in batch.messages if m.seq > handled]
            while batch.more:
                batch = await self.fetch_inbox(max([handled, *(m.seq for m in new)]))
                new += [m for m in batch.messages if m.seq > handled]
            if new:
                handled = new[-1].seq
            return InboxBatch(new, handled, False)

        yield await fresh(first.payload)
        try:
            async for notification in self._fresh(request.observation):
                if notification.code.is_successful():
                    batch = await fresh(notification.payload)
                    if batch.messages:
                        yield batch
        finally:
            if not request.observation.cancelled:  # an error notification already ended it
                request.observation.cancel()

    async def delivery_records(self) -> list[DeliveryRecord]:
        flag = "?a" if self._names_by_number() else ""
        response = await self._ok(Code.GET, f"/o{self.at()}{flag}")
        return codec.decode_records(response.payload, self.contact_list)

    # access rules, watchers, subscriptions, keys ----------------------------------------

    async def get_rules(self) -> AccessRules:
        return codec.decode_rules((await self._ok(Code.GET, f"/r{self.at()}")).payload)

    async def put_rules(self, rules: AccessRules, user: UserId | None = None) -> None:
        await self._ok(Code.PUT, f"/r{self.at(user)}", codec.encode_rules(rules))

    async def watchers(self, user: UserId | None = None) -> list[Subscription]:
        presentity = user or self.user
        response = await self._ok(Code.GET, f"/w{self.at(presentity)}")
        return codec.decode_watchers(response.payload, presentity)

    async def cancel_watcher(self, watcher: UserId | None, user: UserId | None = None) -> None:
        await self._ok(Code.DELETE, f"/w{self.at(user)}?u={watcher or ANONYMOUS}")

    async def subscriptions(self) -> list[SubscriptionStatus]:
        return codec.decode_subscriptions((await self._ok(Code.GET, f"/s{self.at()}")).payload)

    async def publish_keys(self, bundle: bytes) -> None:
        await self._ok(Code.PUT, f"/k{self.at()}", bundle)

    async def fetch_keys(self, user: UserId) -> bytes:
        return bytes((await self._ok(Code.GET, f"/k{self.at(user)}")).payload)
