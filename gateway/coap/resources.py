"""CoAP resources: /p/{user} presence, /i/{user} instant inbox, /o/{user} delivery records.

Each is one PathCapable resource serving every user below its prefix, so there is
no per-user registration in aiocoap's Site. Observations are kept per user; a
change triggers them with no argument, so aiocoap renders each observer's
notification from that observer's own request (never one shared Message: see
aiocoap-notes). The inbox notification carries the queued messages that fit one
datagram, and "more" when the device should fetch with its cursor.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any

from aiocoap import Code, Message, error, resource
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.util.linkformat import Link, LinkFormat

from ..core import codec, inbox, presence
from ..core.errors import (
    BadOption,
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UnsupportedContentFormat,
)
from ..core.ids import UserId, parse_user_id
from ..core.model import Seq
from ..service import GatewayService
from .errors import error_to_response

log = logging.getLogger(__name__)

CBOR = ContentFormat.CBOR
MAX_CURSOR = 2**63 - 1


# Critical options (RFC 7252 5.4.1) this gateway understands; any other critical
# option is answered 4.02, as aiocoap 0.4.17 would otherwise ignore it.
_UNDERSTOOD_CRITICAL = {
    int(number)
    for number in (
        OptionNumber.IF_MATCH,
        OptionNumber.URI_HOST,
        OptionNumber.IF_NONE_MATCH,
        OptionNumber.URI_PORT,
        OptionNumber.OSCORE,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK2,
        OptionNumber.BLOCK1,
    )
}


def _check_critical_options(request: Message) -> None:
    for option in request.opt.option_list():
        if option.number.is_critical() and int(option.number) not in _UNDERSTOOD_CRITICAL:
            raise BadOption(f"unsupported critical option {int(option.number)}")


def _check_body_format(request: Message) -> bytes:
    if request.opt.content_format is not None and request.opt.content_format != CBOR:
        raise UnsupportedContentFormat("application/cbor (60) expected")
    if len(request.payload) > codec.MAX_BODY:
        raise PayloadTooLarge(f"body over {codec.MAX_BODY} bytes")
    return bytes(request.payload)


def _check_accept(request: Message) -> None:
    if request.opt.accept is not None and request.opt.accept != CBOR:
        raise NotAcceptable("only application/cbor (60) is served")


def _query(request: Message, allowed: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in request.opt.uri_query:
        key, _, value = item.partition("=")
        if key not in allowed or key in out:
            raise BadRequest(f"bad query {key!r}")
        out[key] = value
    return out


def _if_match(request: Message) -> list[bytes] | None:
    """If-Match ETags (RFC 7252 5.10.8.1): publish only over the version the client saw."""
    values = list(request.opt.if_match)
    return values or None


def _cursor(value: str | None) -> Seq:
    if value is None:
        return Seq(0)
    # isascii: str.isdigit() also accepts digits like '²' that int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_CURSOR:
        raise BadRequest("cursor must be a non-negative integer")
    return Seq(int(value))


def _cbor_response(payload: bytes, code: Code = Code.CONTENT, **options: Any) -> Message:
    return Message(code=code, payload=payload, content_format=CBOR, **options)


class PerUserResource(resource.ObservableResource, resource.PathCapable):  # type: ignore[misc]
    """Serves ``/{prefix}/{user}``; subclasses implement ``do_<method>(user, request)``."""

    rt = ""
    if_ = ""
    title = ""

    def __init__(self, service: GatewayService) -> None:
        super().__init__()
        self.service = service
        self.observers: defaultdict[UserId, set[Any]] = defaultdict(set)
        self._awaiting_first_render: dict[int, Any] = {}
        self.on_last_observer_gone: Callable[[UserId], Coroutine[Any, Any, None]] | None = None
        self.closing = False

    # Routing -------------------------------------------------------------------------

    def _user_of(self, request: Message) -> UserId:
        path = request.opt.uri_path
        if len(path) != 1:
            raise NotFound("path must be /{prefix}/user@domain")
        try:
            return parse_user_id(path[0])
        except GatewayError as exc:
            raise NotFound(exc.diagnostic) from exc

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render(self, request: Message) -> Message:
        try:
            user = self._user_of(request)
            handler = getattr(self, "do_" + str(request.code).lower(), None)
            if handler is None:
                raise MethodNotAllowed(f"{request.code} not allowed here")
            _check_critical_options(request)
            _check_accept(request)
            response: Message = await handler(user, request)
            if response.code is not None and response.code.is_successful():
                self._establish(request, user)
            return response
        except GatewayError as err:
            return error_to_response(err)
        except error.RenderableError:
            raise
        except Exception:
            # The store (or something unforeseen) failed: nothing was acknowledged.
            log.exception("request %s failed", request.opt.uri_path)
            return error_to_response(StoreUnavailable("temporarily unavailable"))

    # Observation ---------------------------------------------------------------------

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        """Called before the first render; the observation counts only once that render
        succeeded (see ``_establish``): a refused Observe never became a watcher."""
        self._awaiting_first_render[id(request)] = serverobservation

        def cancelled() -> None:
            self._awaiting_first_render.pop(id(request), None)
            for user, watchers in list(self.observers.items()):
                if serverobservation in watchers:
                    watchers.discard(serverobservation)
                    if not watchers:
                        del self.observers[user]
                        if self.on_last_observer_gone is not None and not self.closing:
                            asyncio.get_running_loop().create_task(self.on_last_observer_gone(user))

        # Always accept: aiocoap 0.4.17 calls the cancellation callback of every
        # observation it asked about, and logs a traceback if none was set.
        serverobservation.accept(cancelled)

    def _establish(self, request: Message, user: UserId) -> None:
        serverobservation = self._awaiting_first_render.pop(id(request), None)
        if serverobservation is not None:
            self.observers[user].add(serverobservation)

    def notify(self, user: UserId) -> None:
        for obs in list(self.observers.get(user, ())):
            obs.trigger()

    def observation_count(self) -> int:
        return sum(len(v) for v in self.observers.values())

    def get_resources_as_linkheader(self) -> LinkFormat:
        # One templated entry per collection: listing users would disclose them.
        attrs = [("rt", self.rt), ("if", self.if_), ("obs", None), ("ct", str(int(CBOR))), ("title", self.title)]
        return LinkFormat([Link("/{user}", attrs)])


class PresenceResource(PerUserResource):
    rt = "impp.presence"
    if_ = "core.p"
    title = "presence of user@domain: GET (Observe) / PUT / DELETE"

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        doc = await self.service.fetch_presence(user)
        tag = presence.etag(doc)
        max_age = presence.max_age(doc, self.service.now())
        if tag in request.opt.etags and request.opt.observe is None:
            return Message(code=Code.VALID, etag=tag, max_age=max_age)
        return _cbor_response(codec.encode_presence(doc), etag=tag, max_age=max_age)

    async def do_put(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        doc = codec.decode_presence(_check_body_format(request))
        stored = await self.service.publish_presence(user, doc, if_match=_if_match(request))
        return Message(code=Code.CHANGED, etag=presence.etag(stored))

    do_post = do_put

    async def do_delete(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        stored = await self.service.withdraw_presence(user)
        return Message(code=Code.DELETED, etag=presence.etag(stored))


class InboxResource(PerUserResource):
    def __init__(self, service: GatewayService) -> None:
        super().__init__(service)
        # user -> when it last deregistered its inbox observation on purpose
        self.deregistered: dict[UserId, int] = {}

    rt = "impp.inbox"
    if_ = "core.b"
    title = "instant inbox of user@domain: POST sends, GET ?c=cursor (Observe) reads, DELETE ?c=seq acknowledges"

    async def do_post(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        _, result = await self.service.send_message(user, _check_body_format(request))
        # Same answer for a first send and a resend: the sender cannot tell, and need not.
        return _cbor_response(codec.dumps_seq(result.seq), code=Code.CREATED)

    async def do_get(self, user: UserId, request: Message) -> Message:
        query = _query(request, {"c"})
        if request.opt.observe == 1:
            # RFC 7641 3.6 deregistration: the device leaves on purpose.
            self.deregistered[user] = self.service.now()
        after = _cursor(query.get("c"))
        observing = request.opt.observe == 0
        budget = inbox.NOTIFICATION_BUDGET if observing else codec.MAX_BODY
        batch, more = await self.service.fetch_inbox(user, after, budget, for_notification=observing)
        # Max-Age 0: an inbox read must never be served from a cache.
        return _cbor_response(codec.encode_batch(batch, more), max_age=0)

    async def do_delete(self, user: UserId, request: Message) -> Message:
        query = _query(request, {"c"})
        if "c" not in query:
            raise BadRequest("acknowledge needs ?c=seq")
        await self.service.acknowledge(user, _cursor(query["c"]))
        return Message(code=Code.DELETED)


class OutboxResource(PerUserResource):
    rt = "impp.receipts"
    if_ = "core.s"
    title = "delivery records of messages sent by user@domain: GET (Observe)"

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        records = await self.service.delivery_records(user)
        return _cbor_response(codec.encode_records(records), max_age=0)


class CoapListener:
    """Service change events -> Observe notifications."""

    def __init__(self, presence_res: PresenceResource, inbox_res: InboxResource, outbox_res: OutboxResource):
        self.presence_res = presence_res
        self.inbox_res = inbox_res
        self.outbox_res = outbox_res

    def presence_changed(self, user: UserId) -> None:
        self.presence_res.notify(user)

    def inbox_changed(self, user: UserId) -> None:
        self.inbox_res.notify(user)

    def records_changed(self, sender: UserId) -> None:
        self.outbox_res.notify(sender)
