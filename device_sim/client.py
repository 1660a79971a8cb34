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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message
from aiocoap.numbers.constants import TransportTuning
from aiocoap.proxy.client import ProxyForwarder

from gateway.core import codec
from gateway.core.access import ANONYMOUS, AccessRules
from gateway.core.compression import Dictionary, DictionaryRegistry
from gateway.core.ids import UserId
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


class DeviceClient:
    def __init__(
        self,
        context: aiocoap.Context,
        gateway: str,
        user: UserId,
        timeout: float = DEFAULT_TIMEOUT,
        tuning: TransportTuning | None = None,
    ):
        self.context = context
        self.base = gateway.rstrip("/")
        self.user = user
        self.timeout = timeout
        self.tuning = tuning
        self._closed = False
        self.dictionaries: DictionaryRegistry | None = None
        self._refused: set[str] = set()  # message classes the gateway has no dictionary for
        self.resyncs = 0  # delta notifications that did not apply (gaps): whole document fetched
        self.requester: Any = context  # the context itself, or a ProxyForwarder around it

    @classmethod
    async def create(
        cls,
        gateway: str,
        user: UserId,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: Path | dict[str, Any] | None = None,
        tuning: TransportTuning | None = None,
        proxy: str | None = None,
    ) -> DeviceClient:
        """A device of ``user``; with ``credentials`` (a credentials JSON file as written
        by ``python -m gateway provision``, or its content) every request is OSCORE
        protected, otherwise the device is anonymous. ``tuning`` (optional) sets the
        CoAP transmission parameters of this client's requests. ``proxy`` (a URI such
        as ``coap://127.0.0.1:5690``) sends every request through a CoAP forward proxy;
        OSCORE stays end to end between device and gateway. The gateway URI may use
        ``coap+tcp://`` or ``coap+ws://`` where UDP is blocked."""
        context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6", "tcpclient", "ws"])
        if credentials is not None:
            data = json.loads(Path(credentials).read_text()) if isinstance(credentials, Path) else credentials
            context.client_credentials.load_from_dict(data)
        client = cls(context, gateway, user, timeout, tuning)
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
        msg = self.message(code=code, uri=self.base + path, payload=payload, **options)
        response: Message = await asyncio.wait_for(self.requester.request(msg).response, self.timeout)
        return response

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
        response = await self._compressed("presence", Code.PUT, f"/p/{self.user}", body)
        return bytes(response.opt.etag or b"")

    async def withdraw(self) -> None:
        await self._ok(Code.DELETE, f"/p/{self.user}")

    async def fetch_presence(self, presentity: UserId) -> PresenceDocument:
        response = await self._compressed("presence", Code.GET, f"/p/{presentity}")
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
        request = self.requester.request(
            self.message(code=Code.GET, uri=f"{self.base}/p/{presentity}{query}", observe=0)
        )
        first = await asyncio.wait_for(request.response, self.timeout)
        if not first.code.is_successful():
            raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
        current = codec.decode_presence_view(self._unpack(first))
        yield current
        try:
            async for notification in request.observation:
                if not notification.code.is_successful():
                    continue
                updated = codec.apply_presence_patch(current, self._unpack(notification))
                if updated is None:
                    self.resyncs += 1
                    updated = await self.fetch_presence(presentity)
                current = updated
                yield current
        finally:
            request.observation.cancel()

    # instant messages --------------------------------------------------------------

    @staticmethod
    def new_message_id() -> MessageId:
        # 8 random bytes: collisions (which would be refused as 4.09) stay negligible
        # for billions of messages per sender.
        return MessageId(os.urandom(8))

    async def send(
        self, recipient: UserId, text: str | bytes, msg_id: MessageId | None = None, **fields: object
    ) -> int:
        """Send an IM; returns its sequence number in the recipient's inbox."""
        payload = text.encode("utf-8") if isinstance(text, str) else text
        message = InstantMessage(
            msg_id=msg_id or self.new_message_id(),
            sender=self.user,
            recipient=recipient,
            payload=payload,
            **fields,  # type: ignore[arg-type]
        )
        # OSCORE names the sender: "from" need not travel.
        body = codec.encode_message(message, include_from=False)
        response = await self._compressed("im", Code.POST, f"/i/{recipient}", body)
        return codec.decode_seq(self._unpack(response))

    async def fetch_inbox(self, after: int = 0) -> InboxBatch:
        response = await self._compressed("im", Code.GET, f"/i/{self.user}?c={after}")
        messages, cursor, more = codec.decode_batch(self._unpack(response), self.user)
        return InboxBatch(messages, cursor, more)

    async def acknowledge(self, upto: int) -> None:
        await self._ok(Code.DELETE, f"/i/{self.user}?c={upto}")

    async def watch_inbox(self) -> AsyncIterator[InboxBatch]:
        """Observe the own inbox: yields new queued messages now and at every change.

        Each notification shows the queue head as it is (it may repeat messages not yet
        acknowledged), so messages at or below the highest seq already yielded are
        dropped here: the application sees each message once. When a notification
        says ``more``, the rest is fetched with the cursor."""
        request = self.requester.request(self.message(code=Code.GET, uri=f"{self.base}/i/{self.user}", observe=0))
        first = await asyncio.wait_for(request.response, self.timeout)
        if not first.code.is_successful():
            raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
        handled = 0

        async def fresh(payload: bytes) -> InboxBatch:
            nonlocal handled
            batch = InboxBatch(*codec.decode_batch(payload, self.user))
            new = [m for m in batch.messages if m.seq > handled]
            while batch.more:
                batch = await self.fetch_inbox(max([handled, *(m.seq for m in new)]))
                new += [m for m in batch.messages if m.seq > handled]
            if new:
                handled = new[-1].seq
            return InboxBatch(new, handled, False)

        yield await fresh(first.payload)
        try:
            async for notification in request.observation:
                if notification.code.is_successful():
                    batch = await fresh(notification.payload)
                    if batch.messages:
                        yield batch
        finally:
            request.observation.cancel()

    async def delivery_records(self) -> list[DeliveryRecord]:
        response = await self._ok(Code.GET, f"/o/{self.user}")
        return codec.decode_records(response.payload)

    # access rules, watchers, subscriptions, keys ----------------------------------------

    async def get_rules(self) -> AccessRules:
        return codec.decode_rules((await self._ok(Code.GET, f"/r/{self.user}")).payload)

    async def put_rules(self, rules: AccessRules, user: UserId | None = None) -> None:
        await self._ok(Code.PUT, f"/r/{user or self.user}", codec.encode_rules(rules))

    async def watchers(self, user: UserId | None = None) -> list[Subscription]:
        presentity = user or self.user
        response = await self._ok(Code.GET, f"/w/{presentity}")
        return codec.decode_watchers(response.payload, presentity)

    async def cancel_watcher(self, watcher: UserId | None, user: UserId | None = None) -> None:
        await self._ok(Code.DELETE, f"/w/{user or self.user}?u={watcher or ANONYMOUS}")

    async def subscriptions(self) -> list[SubscriptionStatus]:
        return codec.decode_subscriptions((await self._ok(Code.GET, f"/s/{self.user}")).payload)

    async def publish_keys(self, bundle: bytes) -> None:
        await self._ok(Code.PUT, f"/k/{self.user}", bundle)

    async def fetch_keys(self, user: UserId) -> bytes:
        return bytes((await self._ok(Code.GET, f"/k/{user}")).payload)
