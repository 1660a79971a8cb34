"""Federation: users of other domains, served by other gateways (RFC 2779 2.1, 2.4).

A gateway serves its own domains. A request about a user of another domain (an IM to
``bob@b.example``, a fetch of or subscription to its presence) is carried to the gateway
of that domain, which applies its own rules: nothing about a remote user is decided,
stored or cached here.

Finding the peer (:class:`Resolver`): a static map (``serve --peer DOMAIN=URI``) first,
then, with ``--peer-dns``, DNS SRV ``_coap._udp.DOMAIN`` (RFC 7252 §12.8's service
name; dnspython). Tests use the static map only: no lookup ever
leaves the machine.

Talking to the peer (:class:`Federation`): CoAP over OSCORE between the two gateways.
The serving gateway provisions a context for the peer (``gateway peer provision
DOMAIN``, :meth:`gateway.keys.KeyStore.provision_peer`); its requests are then
authenticated as *the gateway of that domain* (:class:`gateway.keys.PeerClaim`). Such a
request names the user it speaks for in the query ``f=user@domain``
(:data:`ASSERTED_USER`), encrypted inside OSCORE; the serving gateway believes it only
for users of the peer's own domain (:func:`asserted_user`). A peer request without
``f`` is anonymous.

What is relayed: the method, path, query, body and the answer's code, options that
matter (ETag, Max-Age, Content-Format) and body. An IM is acknowledged to the device
only once the recipient's gateway has stored it (its 2.01), so durability and exactly
once (the id travels unchanged; the recipient's gateway deduplicates per sender and id)
hold across gateways; an unreachable peer gives 5.03 and the device retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message

from .coap import observe_cancel
from .coap.notification_order import fresh_notifications, remember_partial_ivs
from .core import codec
from .core.errors import CodecError, Forbidden, PeerRefused, PeerUnavailable
from .core.ids import Domain, UserId, domain_of, parse_domain, parse_user_id
from .core.model import Seq
from .keys import PeerClaim

log = logging.getLogger(__name__)

ASSERTED_USER = "f"  # query key: the user a peer gateway speaks for
PEER_TIMEOUT_S = 10.0
# Requests in flight to one peer at once. They share one OSCORE context, whose receiver
# keeps a replay window of 32 sequence numbers (aiocoap): far more at once arrive out of
# order by more than that and are refused as replays (measured: with 200 at once).
PEER_CONCURRENCY = 16


# -- the serving side ------------------------------------------------------------------


def peer_of(request: Message) -> PeerClaim | None:
    claims = request.remote.authenticated_claims if request.remote is not None else ()
    for claim in claims or ():
        if isinstance(claim, PeerClaim):
            return claim
    return None


def asserted_user(request: Message, peer: PeerClaim) -> UserId | None:
    """The user a peer gateway's request speaks for: only one of the peer's own domain."""
    for item in request.opt.uri_query:
        key, _, value = item.partition("=")
        if key == ASSERTED_USER:
            user = parse_user_id(value)
            if domain_of(user) != peer.domain:
                raise Forbidden(f"the gateway of {peer.domain} may speak only for its own users")
            return user
    return None


# -- finding peers -----------------------------------------------------------------------


class Resolver:
    def __init__(self, static: Mapping[str, str] | None = None, use_dns: bool = False) -> None:
        self.static = {parse_domain(d): uri.rstrip("/") for d, uri in (static or {}).items()}
        self.use_dns = use_dns

    async def resolve(self, domain: Domain) -> str:
        """The base URI (``coap://host:port``) of ``domain``'s gateway."""
        if domain in self.static:
            return self.static[domain]
        if self.use_dns:
            found = await self._srv(domain)
            if found is not None:
                return found
        raise PeerUnavailable(f"no gateway known for {domain}")

    @staticmethod
    async def _srv(domain: Domain) -> str | None:
        import dns.asyncresolver
        import dns.exception

        try:
            answer = await dns.asyncresolver.resolve(f"_coap._udp.{domain}", "SRV", lifetime=3.0)
        except dns.exception.DNSException:
            return None
        records: list[Any] = sorted(answer, key=lambda r: (r.priority, -r.weight))
        if not records:
            return None
        host = str(records[0].target).rstrip(".")
        return f"coap://{host}:{records[0].port}"


# -- talking to peers ----------------------------------------------------------------------


@dataclass
class PeerAnswer:
    code: Code
    payload: bytes
    options: dict[str, Any]

    def raise_for_error(self) -> None:
        if not self.code.is_successful():
            raise PeerRefused(int(self.code), self.payload.decode("utf-8", "replace")[:120])


def _answer(response: Message) -> PeerAnswer:
    options: dict[str, Any] = {}
    if response.opt.etag is not None:
        options["etag"] = response.opt.etag
    if response.opt.max_age is not None:
        options["max_age"] = response.opt.max_age
    if response.opt.content_format is not None:
        options["content_format"] = response.opt.content_format
    return PeerAnswer(response.code, bytes(response.payload), options)


class Federation:
    """The gateway's client side towards the gateways of other domains."""

    def __init__(self, resolver: Resolver, credentials: list[Path | dict[str, Any]], timeout: float = PEER_TIMEOUT_S):
        self.resolver = resolver
        self.credentials = credentials
        self.timeout = timeout
        self.context: aiocoap.Context | None = None
        self._in_flight: dict[Domain, asyncio.Semaphore] = {}

    def _slot(self, user: UserId) -> asyncio.Semaphore:
        return self._in_flight.setdefault(domain_of(user), asyncio.Semaphore(PEER_CONCURRENCY))

    async def start(self) -> Federation:
        import json

        observe_cancel.install()  # a dropped relay must end the observation at the peer
        self.context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        for entry in self.credentials:
            data = json.loads(Path(entry).read_text()) if isinstance(entry, Path | str) else entry
            self.context.client_credentials.load_from_dict(data)
        remember_partial_ivs(self.context.client_credentials)
        return self

    async def close(self) -> None:
        if self.context is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.context.shutdown(), 5)
            self.context = None

    async def _message(
        self,
        code: Code,
        prefix: str,
        user: UserId,
        speaker: UserId | None,
        query: list[str],
        payload: bytes,
        **opts: Any,
    ) -> Message:
        base = await self.resolver.resolve(domain_of(user))
        uri_query = [q for q in query if not q.startswith(f"{ASSERTED_USER}=")]
        if speaker is not None:
            uri_query.append(f"{ASSERTED_USER}={speaker}")
        message = Message(code=code, uri=f"{base}/{prefix}/{user}", payload=payload, **opts)
        message.opt.uri_query = uri_query
        return message

    async def request(
        self,
        code: Code,
        prefix: str,
        user: UserId,
        speaker: UserId | None,
        query: list[str] | None = None,
        payload: bytes = b"",
        **options: Any,
    ) -> PeerAnswer:
        """One request to ``user``'s gateway on behalf of ``speaker`` (None: anonymous)."""
        if self.context is None:
            raise PeerUnavailable("federation is not running")
        message = await self._message(code, prefix, user, speaker, query or [], payload, **options)
        try:
            async with self._slot(user):
                response = await asyncio.wait_for(self.context.request(message).response, self.timeout)
        except Exception as exc:  # timeout, link errors, an answer OSCORE refuses
            log.warning("peer gateway of %s: %s", domain_of(user), exc)
            raise PeerUnavailable(f"gateway of {domain_of(user)} unreachable") from exc
        return _answer(response)

    async def send_message(self, sender: UserId, recipient: UserId, body: bytes) -> Seq:
        """POST an IM to the recipient's gateway for its sender; the seq it was stored under there."""
        answer = await self.request(Code.POST, "i", recipient, sender, payload=body)
        answer.raise_for_error()
        try:
            return Seq(codec.decode_seq(answer.payload))
        except CodecError as exc:
            raise PeerUnavailable(f"gateway of {domain_of(recipient)} answered nonsense") from exc

    async def observe(
        self, prefix: str, user: UserId, speaker: UserId | None, query: list[str] | None = None,
        code: Code = Code.GET, payload: bytes = b"",
    ) -> RemoteObservation:
        if self.context is None:
            raise PeerUnavailable("federation is not running")
        message = await self._message(code, prefix, user, speaker, query or [], payload, observe=0)
        async with self._slot(user):
            request = self.context.request(message)
            try:
                first = await asyncio.wait_for(request.response, self.timeout)
            except Exception as exc:  # timeout, link errors, an answer OSCORE refuses
                if not request.observation.cancelled:
                    request.observation.cancel()
                log.warning("peer gateway of %s: %r", domain_of(user), exc)
                raise PeerUnavailable(f"gateway of {domain_of(user)} unreachable") from exc
        return RemoteObservation(request, _answer(first))


class RemoteObservation:
    """An observation held at a peer gateway for one local watcher: its latest answer,
    and the notifications as they come."""

    def __init__(self, request: Any, first: PeerAnswer) -> None:
        self.request = request
        self.latest = first

    async def updates(self) -> AsyncIterator[PeerAnswer]:
        try:
            async for notification in fresh_notifications(self.request.observation, self._replayed):
                self.latest = _answer(notification)
                yield self.latest
        except aiocoap.error.Error as exc:
            # The peer (or the link to it) ended the observation.
            self.latest = PeerAnswer(Code.SERVICE_UNAVAILABLE, b"peer observation ended", {})
            log.info("remote observation ended: %s", exc)
            yield self.latest

    @staticmethod
    def _replayed() -> None:
        log.warning("dropped a replayed notification from a peer gateway")

    def cancel(self) -> None:
        if not self.request.observation.cancelled:
            self.request.observation.cancel()


# -- fan-in: one observation at the peer for the local watchers of a remote presentity ----


class FanInFull(Exception):
    """More local watchers than one shared observation may carry (codec.MAX_FAN_IN)."""


@dataclass
class FanInGroup:
    presentity: UserId
    wanted: set[UserId]
    lock: asyncio.Lock
    watchers: tuple[UserId, ...] = ()  # as registered at the peer
    views: dict[UserId, bytes | int] | None = None  # a view, or codec.FAN_IN_REFUSED / _CANCELLED
    error: PeerAnswer | None = None  # the peer ended the shared observation
    observation: RemoteObservation | None = None
    relay: asyncio.Task[None] | None = None

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.cancel()
        if self.observation is not None:
            self.observation.cancel()
        self.relay = self.observation = None


class FanIn:
    """The local watchers of one remote presentity share one observation at its gateway
    (``FETCH /p/{presentity}`` with Observe, listing them); that gateway still decides for
    each watcher and answers each distinct view once. Joining or leaving re-registers
    the observation with the new list. ``on_update(presentity, watchers)`` is called with
    the watchers whose view changed; :meth:`view_of` gives a watcher's."""

    def __init__(self, federation: Federation, on_update: Callable[[UserId, set[UserId]], None]) -> None:
        self.federation = federation
        self.on_update = on_update
        self.groups: dict[UserId, FanInGroup] = {}

    async def join(self, presentity: UserId, watcher: UserId) -> None:
        group = self.groups.get(presentity)
        if group is None:
            group = self.groups[presentity] = FanInGroup(presentity, set(), asyncio.Lock())
        if watcher not in group.wanted and len(group.wanted) >= codec.MAX_FAN_IN:
            raise FanInFull(presentity)
        group.wanted.add(watcher)
        async with group.lock:
            if watcher in group.watchers and group.error is None:
                return
            try:
                await self._register(group, tuple(sorted(group.wanted)))
            except Exception:
                group.wanted.discard(watcher)
                if not group.wanted:
                    self._drop(group)
                raise

    def view_of(self, presentity: UserId, watcher: UserId) -> bytes | int | PeerAnswer:
        group = self.groups.get(presentity)
        if group is None or group.views is None or watcher not in group.views:
            return PeerAnswer(Code.SERVICE_UNAVAILABLE, b"no observation at the peer", {})
        if group.error is not None:
            return group.error
        return group.views[watcher]

    async def leave(self, presentity: UserId, watcher: UserId) -> None:
        group = self.groups.get(presentity)
        if group is None:
            return
        group.wanted.discard(watcher)
        async with group.lock:
            if not group.wanted:
                self._drop(group)
            elif watcher in group.watchers:
                with contextlib.suppress(Exception):  # the views of the others stay as they were
                    await self._register(group, tuple(sorted(group.wanted)))

    def close(self) -> None:
        for group in list(self.groups.values()):
            self._drop(group)

    def _drop(self, group: FanInGroup) -> None:
        group.stop()
        if self.groups.get(group.presentity) is group:
            del self.groups[group.presentity]

    async def _register(self, group: FanInGroup, watchers: tuple[UserId, ...]) -> None:
        remote = await self.federation.observe(
            "p", group.presentity, None, code=Code.FETCH, payload=codec.encode_watcher_list(watchers)
        )
        try:
            views = self._views(remote.latest, watchers)
        except Exception:
            remote.cancel()
            raise
        before = group.views or {}
        group.stop()
        group.observation, group.watchers, group.views, group.error = remote, watchers, views, None
        group.relay = asyncio.get_running_loop().create_task(self._relay(group, remote))
        # A change that came while re-registering shows only in the new first answer.
        changed = {w for w, v in views.items() if w in before and before[w] != v}
        if changed:
            self.on_update(group.presentity, changed)

    @staticmethod
    def _views(answer: PeerAnswer, watchers: tuple[UserId, ...]) -> dict[UserId, bytes | int]:
        answer.raise_for_error()
        try:
            views, of = codec.decode_fan_in(answer.payload, len(watchers))
        except CodecError as exc:
            raise PeerUnavailable("peer gateway answered nonsense") from exc
        return {w: (views[i] if i >= 0 else i) for w, i in zip(watchers, of, strict=True)}

    async def _relay(self, group: FanInGroup, remote: RemoteObservation) -> None:
        async for answer in remote.updates():
            if group.observation is not remote:
                return
            before = group.views or {}
            try:
                group.views = self._views(answer, group.watchers)
            except (PeerRefused, PeerUnavailable):
                group.error = answer if not answer.code.is_successful() else PeerAnswer(
                    Code.SERVICE_UNAVAILABLE, b"peer gateway answered nonsense", {}
                )
                self.on_update(group.presentity, set(group.watchers))
                continue
            self.on_update(group.presentity, {w for w, v in group.views.items() if before.get(w) != v})
