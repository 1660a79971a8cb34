"""A device's side of the protocol: a thin, typed client over aiocoap.

aiocoap 0.4.17 requests have no timeout (#396), so every request here is wrapped in
``asyncio.wait_for``. Resending an IM reuses its message id: the gateway stores it
once (exactly once), so a device may retry freely after a lost response.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiocoap
from aiocoap import Code, Message
from aiocoap.numbers.contentformat import ContentFormat

from gateway.core import codec
from gateway.core.ids import UserId
from gateway.core.model import (
    DeliveryRecord,
    InstantMessage,
    MessageId,
    PresenceDocument,
    QueuedMessage,
)

DEFAULT_TIMEOUT = 30.0


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
    def __init__(self, context: aiocoap.Context, gateway: str, user: UserId, timeout: float = DEFAULT_TIMEOUT):
        self.context = context
        self.base = gateway.rstrip("/")
        self.user = user
        self.timeout = timeout
        self._closed = False

    @classmethod
    async def create(cls, gateway: str, user: UserId, timeout: float = DEFAULT_TIMEOUT) -> DeviceClient:
        return cls(await aiocoap.Context.create_client_context(transports=["udp6"]), gateway, user, timeout)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.context.shutdown()

    async def request(self, code: Code, path: str, payload: bytes = b"", **options: object) -> Message:
        if payload:
            options.setdefault("content_format", ContentFormat.CBOR)
        msg = Message(code=code, uri=self.base + path, payload=payload, **options)
        response: Message = await asyncio.wait_for(self.context.request(msg).response, self.timeout)
        return response

    async def _ok(self, code: Code, path: str, payload: bytes = b"", **options: object) -> Message:
        response = await self.request(code, path, payload, **options)
        if not response.code.is_successful():
            raise RequestFailed(response.code, response.payload.decode("utf-8", "replace"))
        return response

    # presence ------------------------------------------------------------------------

    async def publish(self, doc: PresenceDocument) -> bytes:
        response = await self._ok(Code.PUT, f"/p/{self.user}", codec.encode_presence(doc, for_publish=True))
        return bytes(response.opt.etag or b"")

    async def withdraw(self) -> None:
        await self._ok(Code.DELETE, f"/p/{self.user}")

    async def fetch_presence(self, presentity: UserId) -> PresenceDocument:
        response = await self._ok(Code.GET, f"/p/{presentity}")
        return codec.decode_presence_view(response.payload)

    async def watch(self, presentity: UserId) -> AsyncIterator[PresenceDocument]:
        """Subscribe (Observe) to a presentity: yields the current document, then every change."""
        request = self.context.request(Message(code=Code.GET, uri=f"{self.base}/p/{presentity}", observe=0))
        first = await asyncio.wait_for(request.response, self.timeout)
        if not first.code.is_successful():
            raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
        yield codec.decode_presence_view(first.payload)
        try:
            async for notification in request.observation:
                if notification.code.is_successful():
                    yield codec.decode_presence_view(notification.payload)
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
        response = await self._ok(Code.POST, f"/i/{recipient}", codec.encode_message(message))
        return codec.decode_seq(response.payload)

    async def fetch_inbox(self, after: int = 0) -> InboxBatch:
        response = await self._ok(Code.GET, f"/i/{self.user}?c={after}")
        messages, cursor, more = codec.decode_batch(response.payload, self.user)
        return InboxBatch(messages, cursor, more)

    async def acknowledge(self, upto: int) -> None:
        await self._ok(Code.DELETE, f"/i/{self.user}?c={upto}")

    async def watch_inbox(self) -> AsyncIterator[InboxBatch]:
        """Observe the own inbox: yields new queued messages now and at every change.

        Each notification shows the queue head as it is (it may repeat messages not yet
        acknowledged), so messages at or below the highest seq already yielded are
        dropped here: the application sees each message once. When a notification
        says ``more``, the rest is fetched with the cursor."""
        request = self.context.request(Message(code=Code.GET, uri=f"{self.base}/i/{self.user}", observe=0))
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
