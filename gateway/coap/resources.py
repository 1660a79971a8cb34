"""CoAP resources, one PathCapable resource per collection, serving every user below it:

/p/{user} presence, /i/{user} instant inbox, /o/{user} delivery records,
/r/{user} access rules, /w/{user} watchers, /s/{user} subscriptions, /k/{user} keys.

The requester is the principal its OSCORE context authenticates (None when the
request is unprotected); the service decides what it may do. Observations are kept
per user; a change triggers them with no argument, so aiocoap renders each
observer's notification from that observer's own request and identity (per-watcher
views; never one shared Message: see aiocoap-notes). The inbox notification carries
the queued messages that fit one datagram, and "more" when the device should fetch
with its cursor.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any

from aiocoap import Code, Message, error, resource
from aiocoap.numbers import TransportTuning
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.util.linkformat import Link, LinkFormat

from .. import federation
from ..core import access, codec, compression, inbox, presence
from ..core.access import ReadKind, Verdict
from ..core.errors import (
    BadOption,
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    PeerUnavailable,
    StoreUnavailable,
    Unauthorized,
)
from ..core.ids import UserId, domain_of, parse_address, parse_user_id
from ..core.model import Seq
from ..core.subscriptions import Subscription, SubscriptionRegistry, SubscriptionState
from ..keys import PeerClaim
from ..service import GatewayService, PresenceSnapshot, Requester
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


def _query(request: Message, allowed: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    from_peer = federation.peer_of(request) is not None
    for item in request.opt.uri_query:
        key, _, value = item.partition("=")
        if from_peer and key == federation.ASSERTED_USER:
            continue  # whom a peer gateway speaks for: requester_of
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


def requester_of(request: Message) -> Requester:
    """The authenticated principal (OSCORE), or None for an unprotected request. A peer
    gateway's request is the user of its domain it speaks for (``f=``), or anonymous."""
    claims = request.remote.authenticated_claims if request.remote is not None else ()
    for claim in claims or ():
        if isinstance(claim, str):
            return UserId(claim)
        if isinstance(claim, PeerClaim):
            return federation.asserted_user(request, claim)
    return None


class _Reliable(TransportTuning):  # type: ignore[misc]
    reliability = True


class _Unreliable(TransportTuning):  # type: ignore[misc]
    reliability = False


CONFIRMABLE, NON_CONFIRMABLE = _Reliable(), _Unreliable()
CON_EVERY = 8
COAP_DEFAULT_MAX_AGE = 60
CON_INTERVAL_S = 60.0


class PerUserResource(resource.ObservableResource, resource.PathCapable):  # type: ignore[misc]
    """Serves ``/{prefix}/{user}``; subclasses implement ``do_<method>(user, request)``."""

    rt = ""
    if_ = ""
    title = ""
    observable = True

    def __init__(self, service: GatewayService, last_heard: dict[UserId, float] | None = None) -> None:
        super().__init__()
        self.service = service
        self.dictionaries = compression.DictionaryRegistry()  # set by Resources
        # principal -> loop time of its latest request, on any resource: a device that
        # just spoke is in contact, whatever its observations do.
        self.last_heard: dict[UserId, float] = last_heard if last_heard is not None else {}
        self.observers: defaultdict[UserId, set[Any]] = defaultdict(set)
        self.observer_of: dict[Any, Requester] = {}
        # observation -> the peer (host:port) whose request made it
        self.peer_of: dict[Any, str] = {}
        # observation -> the OSCORE context its request came in (None: anonymous)
        self.context_of: dict[Any, object] = {}
        # ids of observations ended because their context moved to another process
        self.moved_away: set[int] = set()
        self._awaiting_first_render: dict[int, Any] = {}
        self.closing = False

    # Routing -------------------------------------------------------------------------

    async def _user_of(self, request: Message) -> UserId:
        """``/{prefix}/user@domain``, or a short form: ``/{prefix}`` (the requester),
        ``/{prefix}/alice`` (its domain), ``/{prefix}/3`` (its contact 3)."""
        try:
            address = parse_address(request.opt.uri_path)
        except GatewayError as exc:
            raise NotFound(exc.diagnostic) from exc
        return await self.service.resolve(address, requester_of(request))

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        return True

    async def render(self, request: Message) -> Message:
        try:
            requester = requester_of(request)
            if requester is not None:
                self.last_heard[requester] = asyncio.get_running_loop().time()
            # A re-render for an established observation (aiocoap hands over the
            # registering request again); the first render is still awaited.
            notification = (
                self.observable and request.opt.observe == 0 and id(request) not in self._awaiting_first_render
            )
            user = await self._user_of(request)
            handler = getattr(self, "do_" + str(request.code).lower(), None)
            if handler is None:
                raise MethodNotAllowed(f"{request.code} not allowed here")
            _check_critical_options(request)
            self.check_accept(request)
            response: Message = await handler(user, request)
            if response.code is not None and response.code.is_successful():
                self._establish(request, user)
                if notification and response.opt.content_format == CBOR:
                    # The registration's response said CBOR; each notification need
                    # not repeat it (2 bytes). A compressed one still names its dictionary.
                    response.opt.content_format = None
            return response
        except GatewayError as err:
            self.refused(request, err)
            return error_to_response(err)
        except error.RenderableError:
            raise
        except Exception:
            # The store (or something unforeseen) failed: nothing was acknowledged.
            log.exception("request %s failed", request.opt.uri_path)
            return error_to_response(StoreUnavailable("temporarily unavailable"))

    # Bodies: CBOR, or CBOR compressed with a trained dictionary -------------------------

    def body_of(self, request: Message) -> bytes:
        """The CBOR body of a request, decompressed if it came compressed."""
        if len(request.payload) > codec.MAX_BODY:
            raise PayloadTooLarge(f"body over {codec.MAX_BODY} bytes")
        return self.dictionaries.decode_body(bytes(request.payload), request.opt.content_format, codec.MAX_BODY)

    def check_accept(self, request: Message) -> None:
        if not compression.acceptable(request.opt.accept, self.dictionaries):
            raise NotAcceptable("Accept 60, or a compressed format with a known dictionary")

    def respond(self, request: Message, cbor: bytes, code: Code = Code.CONTENT, **options: Any) -> Message:
        payload, content_format = self.dictionaries.encode_body(cbor, request.opt.accept)
        return Message(code=code, payload=payload, content_format=content_format, **options)

    # Observation ---------------------------------------------------------------------

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        """Called before the first render; the observation counts only once that render
        succeeded (see ``_establish``): a refused Observe never became a watcher."""
        if not self.observable:
            serverobservation.accept(lambda: None)
            return
        self._awaiting_first_render[id(request)] = serverobservation

        def cancelled() -> None:
            self._awaiting_first_render.pop(id(request), None)
            requester = self.observer_of.pop(serverobservation, None)
            peer = self.peer_of.pop(serverobservation, None)
            self.context_of.pop(serverobservation, None)
            for user, watchers in list(self.observers.items()):
                if serverobservation in watchers:
                    watchers.discard(serverobservation)
                    if not watchers:
                        del self.observers[user]
                    if not self.closing:
                        self.observation_ended(user, requester, serverobservation, peer)
            self.moved_away.discard(id(serverobservation))

        # Always accept: aiocoap 0.4.17 calls the cancellation callback of every
        # observation it asked about, and logs a traceback if none was set.
        serverobservation.accept(cancelled)

    def _establish(self, request: Message, user: UserId) -> None:
        serverobservation = self._awaiting_first_render.pop(id(request), None)
        if serverobservation is not None:
            self.observers[user].add(serverobservation)
            self.observer_of[serverobservation] = requester_of(request)
            context = getattr(request.remote, "security_context", None)
            if context is not None:
                self.context_of[serverobservation] = context
            self.peer_of[serverobservation] = request.remote.hostinfo
            self.observation_started(user, request, serverobservation)

    def observation_started(self, user: UserId, request: Message, serverobservation: Any) -> None:
        """Hook: an observation of ``user`` was established."""

    def observation_ended(self, user: UserId, requester: Requester, serverobservation: Any, peer: str | None) -> None:
        """Hook: an established observation of ``user`` ended (any reason)."""

    def refused(self, request: Message, err: GatewayError) -> None:
        """Hook: a request (or a notification's re-render) was answered with an error."""

    def notify(self, user: UserId) -> None:
        for obs in list(self.observers.get(user, ())):
            obs.trigger()

    def observation_count(self) -> int:
        return sum(len(v) for v in self.observers.values())

    def get_resources_as_linkheader(self) -> LinkFormat:
        # One templated entry per collection: listing users would disclose them.
        attrs: list[tuple[str, str | None]] = [
            ("rt", self.rt),
            ("if", self.if_),
            ("ct", str(int(CBOR))),
            ("title", self.title),
        ]
        if self.observable:
            attrs.insert(2, ("obs", None))
        return LinkFormat([Link("/{user}", attrs)])


class PresenceResource(PerUserResource):
    rt = "impp.presence"
    if_ = "core.p"
    title = "presence of user@domain: GET (Observe) / PUT / DELETE"

    def __init__(self, service: GatewayService, last_heard: dict[UserId, float] | None = None) -> None:
        super().__init__(service, last_heard)
        self.subscriptions = SubscriptionRegistry()
        # Told when someone's watchers or subscriptions change (drives /w and /s).
        self.on_watch_change: Callable[[UserId, Requester], None] = lambda presentity, watcher: None
        self._observation_by_request: dict[int, Any] = {}
        self._verdict_of_first_render: dict[int, Verdict] = {}
        self._end_reason: dict[int, SubscriptionState] = {}
        self._last_sent: dict[int, tuple[bytes, int]] = {}  # delta watchers: request id -> (body, version)
        self._notification_state: dict[int, tuple[int, float]] = {}  # request id -> (NONs since CON, last CON)
        self._snapshots: dict[UserId, asyncio.Future[PresenceSnapshot]] = {}  # taken at the latest change
        self.federation: federation.Federation | None = None  # set when federation is on
        self.fan_in: federation.FanIn | None = None
        self._fan_in_local: dict[int, tuple[UserId, UserId]] = {}  # request id -> (remote presentity, watcher)
        # request id -> its observation at the peer gateway (a remote presentity)
        self.remote_observations: dict[int, federation.RemoteObservation] = {}
        self._relays: dict[int, asyncio.Task[None]] = {}
        # Fan-in observations from peer gateways, by request id (keys: one subscription per watcher)
        self._fan_in_first: dict[int, tuple[tuple[UserId, ...], list[Verdict | None]]] = {}
        self._fan_in_keys: dict[int, list[int]] = {}
        self._fan_in_cancelled: dict[int, set[UserId]] = {}
        # observation id -> (request id, watchers)
        self._fan_in_watchers: dict[int, tuple[int, tuple[UserId, ...]]] = {}
        self._fan_in_peer: dict[int, str | None] = {}  # observation id -> the peer's domain
        self._fan_in_key_counter = itertools.count(1 << 62)  # apart from id() keys

    async def do_get(self, user: UserId, request: Message) -> Message:
        query = _query(request, {"d", "n"})
        if not self.service.serves(user):
            return await self._remote_get(user, request)
        subscribing = request.opt.observe == 0
        # A deregistration (Observe 1) is subscription business too.
        kind = ReadKind.FETCH if request.opt.observe is None else ReadKind.SUBSCRIBE
        renotifying = subscribing and id(request) in self._observation_by_request
        snapshot = await self._snapshot(user) if renotifying else None
        view = await self.service.view_presence(user, requester_of(request), kind, snapshot)
        if subscribing:
            obs = self._observation_by_request.get(id(request))
            if obs is None:
                self._verdict_of_first_render[id(request)] = view.verdict
            else:  # a notification: the rules may have changed since
                self.subscriptions.update_block(id(obs), view.verdict is Verdict.POLITELY_BLOCKED)
        doc = view.document
        body = codec.encode_presence(doc)
        tag = presence.representation_etag(doc, body)
        # Max-Age 60 is CoAP's default (RFC 7252 5.10.5): sent only when it differs.
        max_age = presence.max_age(doc, self.service.now())
        age_option = {} if max_age == COAP_DEFAULT_MAX_AGE else {"max_age": max_age}
        if tag in request.opt.etags and request.opt.observe is None:
            return Message(code=Code.VALID, etag=tag, **age_option)
        options: dict[str, Any] = {"etag": tag, **age_option}
        if subscribing and "n" in query and id(request) in self._observation_by_request:
            options["transport_tuning"] = self._notification_tuning(id(request))
        if subscribing and "d" in query:
            return self.respond(request, self._delta(request, body, doc.version), **options)
        return self.respond(request, body, **options)

    def notify(self, user: UserId) -> None:
        # One read of the store for the notifications of every watcher (fan-out).
        if self.observers.get(user):
            task = asyncio.ensure_future(self.service.presence_snapshot(user))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, even if unused
            self._snapshots[user] = task
        super().notify(user)

    async def _snapshot(self, user: UserId) -> PresenceSnapshot | None:
        task = self._snapshots.get(user)
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except GatewayError:
            return None  # the regular path says what is wrong

    async def _remote_get(self, user: UserId, request: Message) -> Message:
        """A presentity of another domain: asked of its gateway for this requester, whose
        rules decide there. A subscription holds one observation there per local one and
        relays each notification (``gateway/federation.py``)."""
        requester = requester_of(request)
        if self.federation is None or (requester is not None and not self.service.serves(requester)):
            raise NotFound("domain not served here")  # no relaying between two other domains
        if request.opt.observe != 0:
            answer = await self.federation.request(Code.GET, "p", user, requester)
        elif requester is not None and self.fan_in is not None and id(request) not in self.remote_observations:
            return await self._fan_in_view(user, requester, request)
        else:
            answer = await self._own_remote_observation(user, requester, request)
        answer.raise_for_error()
        return Message(code=answer.code, payload=answer.payload, **answer.options)

    async def _own_remote_observation(
        self, user: UserId, watcher: Requester, request: Message
    ) -> federation.PeerAnswer:
        """The latest answer of the observation this local one holds at the peer on its
        own (anonymous watchers, and watchers past the fan-in limit), made at first render."""
        assert self.federation is not None
        remote = self.remote_observations.get(id(request))
        if remote is None:
            remote = await self.federation.observe("p", user, watcher)
            self.remote_observations[id(request)] = remote
            self._relays[id(request)] = asyncio.get_running_loop().create_task(self._relay(id(request), remote))
        return remote.latest

    async def _fan_in_view(self, user: UserId, watcher: UserId, request: Message) -> Message:
        """This watcher's view from the observation it shares with the other local
        watchers of ``user`` at the peer (federation.FanIn); past the limit of one shared
        observation, a watcher of its own (the ``else`` of :meth:`_remote_get`)."""
        assert self.fan_in is not None and self.federation is not None
        if id(request) not in self._fan_in_local:
            try:
                await self.fan_in.join(user, watcher)
            except federation.FanInFull:
                answer = await self._own_remote_observation(user, watcher, request)
                answer.raise_for_error()
                return Message(code=answer.code, payload=answer.payload, **answer.options)
            self._fan_in_local[id(request)] = (user, watcher)
        view = self.fan_in.view_of(user, watcher)
        if isinstance(view, federation.PeerAnswer):
            view.raise_for_error()
            raise PeerUnavailable("peer observation ended")
        if view == codec.FAN_IN_REFUSED:
            raise Forbidden(f"refused by {user}")
        if view == codec.FAN_IN_CANCELLED:
            raise Forbidden(f"subscription cancelled by {user}")
        assert isinstance(view, bytes)
        doc = codec.decode_presence_view(view)
        max_age = presence.max_age(doc, self.service.now())
        age_option = {} if max_age == COAP_DEFAULT_MAX_AGE else {"max_age": max_age}
        return self.respond(request, view, etag=presence.representation_etag(doc, view), **age_option)

    def fan_in_updated(self, presentity: UserId, watchers: set[UserId]) -> None:
        for request_id, (user, watcher) in list(self._fan_in_local.items()):
            obs = self._observation_by_request.get(request_id)
            if user == presentity and watcher in watchers and obs is not None:
                obs.trigger()

    def _leave_fan_in(self, request_id: int) -> None:
        entry = self._fan_in_local.pop(request_id, None)
        if entry is None or self.fan_in is None or entry in self._fan_in_local.values():
            return  # another local observation of the same watcher still needs it
        asyncio.get_running_loop().create_task(self.fan_in.leave(*entry))

    async def _relay(self, request_id: int, remote: federation.RemoteObservation) -> None:
        async for _ in remote.updates():
            obs = self._observation_by_request.get(request_id)
            if obs is not None:
                obs.trigger()  # re-rendered from remote.latest

    def drop_remote(self, request_id: int) -> None:
        self._leave_fan_in(request_id)
        remote = self.remote_observations.pop(request_id, None)
        if remote is not None:
            remote.cancel()
        relay = self._relays.pop(request_id, None)
        if relay is not None:
            relay.cancel()

    # Fan-in, serving side: one observation from a peer gateway for several of its users.

    async def do_fetch(self, user: UserId, request: Message) -> Message:
        """``FETCH /p/{user}`` (Observe optional) from a peer gateway, whose body lists
        watchers of its own domain: each gets the view this presentity's rules give it,
        each distinct view is sent once (docs/protocol.md 1.4, fan-in)."""
        peer = federation.peer_of(request)
        if peer is None:
            raise MethodNotAllowed("FETCH /p is for peer gateways (fan-in)")
        _query(request, set())
        watchers = codec.decode_watcher_list(self.body_of(request))
        for watcher in watchers:
            if domain_of(watcher) != peer.domain:
                raise Forbidden(f"the gateway of {peer.domain} may speak only for its own users")
        kind = ReadKind.FETCH if request.opt.observe is None else ReadKind.SUBSCRIBE
        keys = self._fan_in_keys.get(id(request))
        snapshot = await self._snapshot(user) if keys is not None else None
        cancelled = self._fan_in_cancelled.get(id(request), set())
        views: list[bytes] = []
        of: list[int] = []
        verdicts: list[Verdict | None] = []
        for watcher in watchers:
            if watcher in cancelled:
                of.append(codec.FAN_IN_CANCELLED)
                verdicts.append(None)
                continue
            try:
                view = await self.service.view_presence(user, watcher, kind, snapshot)
            except (Forbidden, Unauthorized):
                of.append(codec.FAN_IN_REFUSED)
                verdicts.append(Verdict.REFUSED)
                continue
            body = codec.encode_presence(view.document)
            if body not in views:
                views.append(body)
            of.append(views.index(body))
            verdicts.append(view.verdict)
        if keys is not None:  # a notification: keep each watcher's subscription current
            for key, verdict in zip(keys, verdicts, strict=True):
                if verdict is None or verdict is Verdict.REFUSED:
                    self.subscriptions.end(key, SubscriptionState.REFUSED if verdict else None, self.service.now())
                else:
                    self.subscriptions.update_block(key, verdict is Verdict.POLITELY_BLOCKED)
        else:
            self._fan_in_first[id(request)] = (watchers, verdicts)
        return self.respond(request, codec.encode_fan_in(views, of), max_age=0)

    def _fan_in_started(self, user: UserId, request: Message, serverobservation: Any) -> bool:
        first = self._fan_in_first.pop(id(request), None)
        if first is None:
            return False
        keys = []
        for watcher, verdict in zip(*first, strict=True):
            key = next(self._fan_in_key_counter)
            keys.append(key)
            if verdict is not None and verdict is not Verdict.REFUSED:
                subscription = Subscription(watcher, user, self.service.now(), verdict is Verdict.POLITELY_BLOCKED)
                self.subscriptions.add(key, subscription)
                self.on_watch_change(user, watcher)
        self._fan_in_keys[id(request)] = keys
        self._fan_in_watchers[id(serverobservation)] = (id(request), first[0])
        self._observation_by_request[id(request)] = serverobservation
        # A peer re-registers when its set of watchers changes; the observation this one
        # replaces ends now (aiocoap's client cannot deregister, and a lazy end would
        # list its watchers twice until the next notification).
        peer = federation.peer_of(request)
        for other in list(self.observers.get(user, ())):
            if other is not serverobservation and id(other) in self._fan_in_watchers:
                if self._fan_in_peer.get(id(other)) == (peer.domain if peer else None):
                    other.trigger(Message(code=Code.CONFLICT, payload=b"superseded by a newer fan-in observation"))
        self._fan_in_peer[id(serverobservation)] = peer.domain if peer else None
        return True

    def _fan_in_ended(self, user: UserId, serverobservation: Any) -> bool:
        self._fan_in_peer.pop(id(serverobservation), None)
        entry = self._fan_in_watchers.pop(id(serverobservation), None)
        if entry is None:
            return False
        request_id, watchers = entry
        self._fan_in_cancelled.pop(request_id, None)
        self._observation_by_request.pop(request_id, None)
        for key, watcher in zip(self._fan_in_keys.pop(request_id, []), watchers, strict=False):
            if self.subscriptions.end(key, None, self.service.now()) is not None:
                self.on_watch_change(user, watcher)
        return True

    def _notification_tuning(self, request_id: int) -> TransportTuning:
        """For a watcher that asked (``?n``, devices on lossy, slow links): presence
        notifications go NON (no ACK on the air, no NSTART queue behind a lost one: the
        next notification supersedes it), with a CON every
        ``CON_EVERY`` notifications or ``CON_INTERVAL_S`` seconds, so a watcher that
        vanished is found and dropped (RFC 7641 4.5 asks for one CON a day at least)."""
        now = asyncio.get_running_loop().time()
        count, last_con = self._notification_state.get(request_id, (0, now))
        count += 1
        if count >= CON_EVERY or now - last_con >= CON_INTERVAL_S:
            self._notification_state[request_id] = (0, now)
            return CONFIRMABLE
        self._notification_state[request_id] = (count, last_con)
        return NON_CONFIRMABLE

    def _delta(self, request: Message, body: bytes, version: int) -> bytes:
        """For a watcher that asked for deltas (``?d``): a patch against what it was
        last sent, when smaller; the watcher resyncs with a GET after a gap."""
        previous = self._last_sent.get(id(request))
        self._last_sent[id(request)] = (body, version)
        if previous is None or previous[1] == version:
            return body
        return codec.presence_patch(previous[0], body, previous[1]) or body

    def observation_started(self, user: UserId, request: Message, serverobservation: Any) -> None:
        if self._fan_in_started(user, request, serverobservation):
            return
        verdict = self._verdict_of_first_render.pop(id(request), Verdict.GRANTED)
        watcher = requester_of(request)
        self._observation_by_request[id(request)] = serverobservation
        self.subscriptions.add(
            id(serverobservation),
            Subscription(watcher, user, self.service.now(), verdict is Verdict.POLITELY_BLOCKED),
        )
        self.on_watch_change(user, watcher)

    def observation_ended(self, user: UserId, requester: Requester, serverobservation: Any, peer: str | None) -> None:
        if not self.observers.get(user):
            self._snapshots.pop(user, None)
        if self._fan_in_ended(user, serverobservation):
            return
        for request_id, obs in list(self._observation_by_request.items()):
            if obs is serverobservation:
                del self._observation_by_request[request_id]
                self._last_sent.pop(request_id, None)
                self._notification_state.pop(request_id, None)
                self.drop_remote(request_id)
        reason = self._end_reason.pop(id(serverobservation), None)
        self.subscriptions.end(id(serverobservation), reason, self.service.now())
        self.on_watch_change(user, requester)

    def refused(self, request: Message, err: GatewayError) -> None:
        self._verdict_of_first_render.pop(id(request), None)
        if id(request) not in self._observation_by_request:
            self.drop_remote(id(request))  # a refused registration holds nothing at the peer
        if id(request) not in self._observation_by_request:
            self._last_sent.pop(id(request), None)
        obs = self._observation_by_request.get(id(request))
        if obs is not None:
            # A notification's re-render was refused: the rules changed under it.
            self._end_reason.setdefault(id(obs), SubscriptionState.REFUSED)

    def end_reason(self, serverobservation: Any, state: SubscriptionState) -> None:
        self._end_reason[id(serverobservation)] = state

    def cancel_watcher(self, presentity: UserId, watcher: Requester, by_admin: bool) -> int:
        """End every subscription of ``watcher`` to ``presentity``, telling the watcher
        with a final 4.03 notification (RFC 7641: an error ends an observation)."""
        state = SubscriptionState.CANCELLED_BY_ADMINISTRATOR if by_admin else SubscriptionState.CANCELLED_BY_PRESENTITY
        ended = 0
        for obs in list(self.observers.get(presentity, ())):
            fan_in = self._fan_in_watchers.get(id(obs))
            if fan_in is not None and watcher in fan_in[1]:
                # Shared with other watchers: this one alone is told, in the next answer.
                request_id, watchers = fan_in
                self._fan_in_cancelled.setdefault(request_id, set()).add(watcher)
                key = self._fan_in_keys[request_id][watchers.index(watcher)]
                self.subscriptions.end(key, state, self.service.now())
                obs.trigger()
                ended += 1
                continue
            if self.observer_of.get(obs, "?") == watcher:
                self._end_reason[id(obs)] = state
                # A fresh Message per observer: aiocoap mutates what it sends.
                obs.trigger(
                    Message(code=Code.FORBIDDEN, payload=f"subscription cancelled by {presentity}"[:120].encode())
                )
                ended += 1
        return ended

    async def do_put(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        doc = codec.decode_presence(self.body_of(request))
        stored = await self.service.publish_presence(user, doc, requester_of(request), if_match=_if_match(request))
        return Message(code=Code.CHANGED, etag=presence.representation_etag(stored, codec.encode_presence(stored)))

    do_post = do_put

    async def do_delete(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        stored = await self.service.withdraw_presence(user, requester_of(request))
        return Message(code=Code.DELETED, etag=presence.representation_etag(stored, codec.encode_presence(stored)))


class InboxResource(PerUserResource):
    rt = "impp.inbox"
    if_ = "core.b"
    title = "instant inbox of user@domain: POST sends, GET ?c=cursor (Observe) reads, DELETE ?c=seq acknowledges"

    def __init__(self, service: GatewayService, last_heard: dict[UserId, float] | None = None) -> None:
        super().__init__(service, last_heard)
        # Called when the last observation by an inbox's own principal ended, with the
        # peer it had been made from.
        self.on_owner_gone: Callable[[UserId, str | None], Coroutine[Any, Any, None]] | None = None

    def owner_is_observing(self, user: UserId) -> bool:
        return any(self.observer_of.get(obs) == user for obs in self.observers.get(user, ()))

    def observation_ended(self, user: UserId, requester: Requester, serverobservation: Any, peer: str | None) -> None:
        if id(serverobservation) in self.moved_away:
            return  # not gone: it speaks to another gateway process now
        # Only the owner's own device going silent says something about its presence.
        if requester == user and not self.owner_is_observing(user) and self.on_owner_gone is not None:
            asyncio.get_running_loop().create_task(self.on_owner_gone(user, peer))

    async def do_post(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        _, result = await self.service.send_message(user, self.body_of(request), requester_of(request))
        # Same answer for a first send and a resend: the sender cannot tell, and need not.
        return self.respond(request, codec.dumps_seq(result.seq), code=Code.CREATED)

    async def do_get(self, user: UserId, request: Message) -> Message:
        query = _query(request, {"c", "a"})
        requester = requester_of(request)
        after = _cursor(query.get("c"))
        observing = request.opt.observe == 0
        budget = inbox.NOTIFICATION_BUDGET if observing else codec.MAX_BODY
        batch, more = await self.service.fetch_inbox(user, requester, after, budget, for_notification=observing)
        aliases = await self.service.contact_numbers(requester) if "a" in query else None
        # Max-Age 0: an inbox read must never be served from a cache.
        return self.respond(request, codec.encode_batch(batch, more, aliases), max_age=0)

    async def do_delete(self, user: UserId, request: Message) -> Message:
        query = _query(request, {"c"})
        if "c" not in query:
            raise BadRequest("acknowledge needs ?c=seq")
        await self.service.acknowledge(user, requester_of(request), _cursor(query["c"]))
        return Message(code=Code.DELETED)


class OutboxResource(PerUserResource):
    rt = "impp.receipts"
    if_ = "core.s"
    title = "delivery records of messages sent by user@domain: GET (Observe)"

    async def do_get(self, user: UserId, request: Message) -> Message:
        query = _query(request, {"a"})
        requester = requester_of(request)
        records = await self.service.delivery_records(user, requester)
        aliases = await self.service.contact_numbers(requester) if "a" in query else None
        return self.respond(request, codec.encode_records(records, aliases), max_age=0)


class RulesResource(PerUserResource):
    rt = "impp.rules"
    if_ = "core.p"
    title = "access rules of user@domain (its principal or an administrator): GET / PUT"
    observable = False

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        rules = await self.service.get_rules(user, requester_of(request))
        return self.respond(request, codec.encode_rules(rules), max_age=0)

    async def do_put(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        rules = codec.decode_rules(self.body_of(request))
        await self.service.put_rules(user, rules, requester_of(request))
        return Message(code=Code.CHANGED)


class SubscriptionBookResource(PerUserResource):
    """A view of the presence resource's subscription registry."""

    def __init__(
        self, service: GatewayService, presence_res: PresenceResource, last_heard: dict[UserId, float]
    ) -> None:
        super().__init__(service, last_heard)
        self.presence_res = presence_res


class WatchersResource(SubscriptionBookResource):
    """A presentity's watchers (5.1.11): who, since when, politely blocked or not."""

    rt = "impp.watchers"
    if_ = "core.s"
    title = "watchers of user@domain (its principal or an administrator): GET (Observe), DELETE ?u=watcher"

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        await self.service.authorize_owner(user, requester_of(request), "see who watches")
        return self.respond(
            request, codec.encode_watchers(self.presence_res.subscriptions.watchers_of(user)), max_age=0
        )

    async def do_delete(self, user: UserId, request: Message) -> Message:
        """Cancel a watcher's subscriptions (5.1.16); ``u=anonymous`` ends the anonymous ones."""
        query = _query(request, {"u"})
        requester = requester_of(request)
        await self.service.authorize_owner(user, requester, "cancel subscriptions")
        if "u" not in query:
            raise BadRequest("cancel needs ?u=watcher")
        text = query["u"]
        watcher: Requester = None if text == access.ANONYMOUS else parse_user_id(text)
        if not self.presence_res.cancel_watcher(user, watcher, by_admin=requester != user):
            raise NotFound("no such subscription")
        return Message(code=Code.DELETED)


class SubscriptionsResource(SubscriptionBookResource):
    """A watcher's own subscriptions and how recent ones ended (5.1.9, 5.1.10)."""

    rt = "impp.subscriptions"
    if_ = "core.s"
    title = "subscriptions of user@domain (its principal or an administrator): GET (Observe)"

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        await self.service.authorize_owner(user, requester_of(request), "see these subscriptions")
        return self.respond(
            request, codec.encode_subscriptions(self.presence_res.subscriptions.subscriptions_of(user)), max_age=0
        )


class KeysResource(PerUserResource):
    """Public keys for end-to-end signatures and encryption (5.3.1, 5.4.6, 5.4.9)."""

    rt = "impp.keys"
    if_ = "core.p"
    title = "public key bundle of user@domain: GET, PUT (its principal)"
    observable = False

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        return self.respond(request, await self.service.get_key_bundle(user))

    async def do_put(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        await self.service.put_key_bundle(user, self.body_of(request), requester_of(request))
        return Message(code=Code.CHANGED)


class ContactsResource(PerUserResource):
    """The principal's numbered contacts: contact n is what the short path segment ``n``
    names in its requests (``POST /i/3``), so a device on a narrow link need not spell
    out ``user@domain`` in every request. Private to the principal."""

    rt = "impp.contacts"
    if_ = "core.p"
    title = "numbered contacts of user@domain (aliases for paths): GET, PUT (its principal)"
    observable = False

    async def do_get(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        contacts = await self.service.get_contacts(user, requester_of(request))
        return self.respond(request, codec.encode_contacts(contacts))

    async def do_put(self, user: UserId, request: Message) -> Message:
        _query(request, set())
        contacts = codec.decode_contacts(self.body_of(request))
        await self.service.put_contacts(user, contacts, requester_of(request))
        return Message(code=Code.CHANGED)


class CoapListener:
    """Service change events -> Observe notifications."""

    def __init__(self, resources: Resources) -> None:
        self.res = resources

    def presence_changed(self, user: UserId) -> None:
        self.res.presence.notify(user)

    def rules_changed(self, user: UserId) -> None:
        # Re-render every subscription under the new rules: newly refused watchers get
        # a final 4.03, views and polite blocks change at once.
        self.res.presence.notify(user)
        self.res.inbox.notify(user)

    def inbox_changed(self, user: UserId) -> None:
        self.res.inbox.notify(user)

    def records_changed(self, sender: UserId) -> None:
        self.res.outbox.notify(sender)


class Resources:
    """Every collection, wired together."""

    def __init__(self, service: GatewayService) -> None:
        self.last_heard: dict[UserId, float] = {}
        heard = self.last_heard
        self.presence = PresenceResource(service, heard)
        self.inbox = InboxResource(service, heard)
        self.outbox = OutboxResource(service, heard)
        self.rules = RulesResource(service, heard)
        self.watchers = WatchersResource(service, self.presence, heard)
        self.subscriptions = SubscriptionsResource(service, self.presence, heard)
        self.keys = KeysResource(service, heard)
        self.contacts = ContactsResource(service, heard)
        self.presence.on_watch_change = self._watch_changed

    def use_dictionaries(self, registry: compression.DictionaryRegistry) -> None:
        for res in self.all():
            res.dictionaries = registry

    def _watch_changed(self, presentity: UserId, watcher: Requester) -> None:
        self.watchers.notify(presentity)
        if watcher is not None:
            self.subscriptions.notify(watcher)

    def by_path(self) -> dict[str, PerUserResource]:
        return {
            "p": self.presence,
            "i": self.inbox,
            "o": self.outbox,
            "r": self.rules,
            "w": self.watchers,
            "s": self.subscriptions,
            "k": self.keys,
            "c": self.contacts,
        }

    def all(self) -> list[PerUserResource]:
        return list(self.by_path().values())

    def end_observations_of(self, requester: UserId, reason: str) -> int:
        """End every observation ``requester`` made (its credentials were revoked)."""
        ended = 0
        for res in self.all():
            for obs, who in list(res.observer_of.items()):
                if who == requester:
                    if res is self.presence:
                        self.presence.end_reason(obs, SubscriptionState.CANCELLED_BY_ADMINISTRATOR)
                    # A fresh Message per observer: aiocoap mutates what it sends.
                    obs.trigger(Message(code=Code.UNAUTHORIZED, payload=reason.encode()[:120]))
                    ended += 1
        return ended

    def end_observations_in(self, context: object, reason: str) -> int:
        """End every observation made under the OSCORE ``context`` with a 5.03: it is
        moving to another gateway process (``handoff.py``), where the device registers
        again. Its watches were not cancelled by anyone."""
        ended = 0
        for res in self.all():
            for obs, made_in in list(res.context_of.items()):
                if made_in is context:
                    res.moved_away.add(id(obs))
                    obs.trigger(Message(code=Code.SERVICE_UNAVAILABLE, max_age=0, payload=reason.encode()[:120]))
                    ended += 1
        return ended
