"""Assembly: store + service + CoAP site + timers, started and stopped as one gateway."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiocoap
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

from .bus import EventBus, SharedListener, open_bus
from .coap import icmp, speedups
from .coap.exchange_lifetime import RFC7252_EXCHANGE_LIFETIME, DuplicateCache
from .coap.handoff import ContextHandoff
from .coap.loop_errors import ContainedLoopErrors, raised_in
from .coap.resources import CoapListener, InboxResource, PresenceResource, Resources
from .coap.site import DeregistrationWatch, GatewaySite, WellKnownCore
from .core.ids import Domain, UserId, parse_user_id
from .dictionaries import load_registry
from .federation import FanIn, Federation
from .keys import KeyStore, KidIndexedCredentials
from .service import GatewayService
from .store import Store, open_store

log = logging.getLogger(__name__)

DEFAULT_PORT = 5683


@dataclass
class Counters:
    undecodable_datagrams: int = 0
    out_of_contact_by_link_loss: int = 0


def _contain_bad_utf8(loop: asyncio.AbstractEventLoop, counters: Counters) -> ContainedLoopErrors:
    """aiocoap 0.4.17 lets a UnicodeDecodeError escape its datagram callback for each
    datagram whose string option (Uri-Path etc.) is not UTF-8 (see aiocoap-notes);
    asyncio would log a full traceback each time, so anyone able to send UDP could flood
    the log. Count such drops instead and log one line now and then."""

    def dropped() -> None:
        counters.undecodable_datagrams += 1
        count = counters.undecodable_datagrams
        if count in (1, 10, 100, 1000) or count % 10000 == 0:
            log.warning("dropped %d datagrams with non-UTF-8 options", count)

    return ContainedLoopErrors(
        loop, lambda exc: isinstance(exc, UnicodeDecodeError) and raised_in(exc, "/aiocoap/"), dropped
    )


# Our names for transports -> aiocoap's. UDP is the default; CoAP over TCP and over
# WebSockets (RFC 8323) are for networks that block UDP. aiocoap binds WebSockets to
# the given port + 3000 (8683 for 5683).
TRANSPORTS = {"udp": "udp6", "tcp": "tcpserver", "ws": "ws"}
WS_PORT_OFFSET = 3000


def aiocoap_transports(names: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in TRANSPORTS]
    if unknown or "udp" not in chosen:
        raise ValueError(f"transports must include udp and be among {', '.join(TRANSPORTS)}; got {chosen}")
    return [TRANSPORTS[n] for n in chosen]


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST`` -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or DEFAULT_PORT)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, DEFAULT_PORT


@dataclass
class Gateway:
    service: GatewayService
    context: aiocoap.Context
    store: Store
    resources: Resources
    credentials: KidIndexedCredentials | None
    deregistrations: DeregistrationWatch
    bus: EventBus
    counters: Counters
    sweep_interval: float
    link_loss_grace: float = 0.5
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _containment: ContainedLoopErrors | None = None
    send_guard: icmp.StaleErrorSafeSend | None = None
    federation: Federation | None = None
    handoff: ContextHandoff | None = None
    duplicates: DuplicateCache | None = None

    @classmethod
    async def start(
        cls,
        *,
        bind: tuple[str, int] = ("::", DEFAULT_PORT),
        store: str | Store = "sqlite:gateway.db",
        domains: Iterable[str] = ("example.org",),
        keys: KeyStore | Path | None = None,
        admins: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 1.0,
        bus: str | None = None,
        transports: Iterable[str] = ("udp",),
        udp_buffer: int = 4 * 1024 * 1024,
        exchange_lifetime: float = RFC7252_EXCHANGE_LIFETIME,
    ) -> Gateway:
        """Start serving. With ``keys`` (the OSCORE key store) requests protected by a
        provisioned context carry that principal's identity; unprotected ones are
        anonymous. Without it every request is anonymous (and may do little)."""
        speedups.install()
        the_store = await open_store(store) if isinstance(store, str) else store
        service = GatewayService(
            the_store,
            [Domain(d.lower()) for d in domains],
            clock,
            admins=[parse_user_id(a) for a in admins],
        )
        resources = Resources(service)
        resources.use_dictionaries(load_registry())
        event_bus = open_bus(bus)
        shared = SharedListener(CoapListener(resources), event_bus)
        service.listener = shared
        await event_bus.start(shared.deliver)

        site = GatewaySite()
        site.add_resource([".well-known", "core"], WellKnownCore(site.get_resources_as_linkheader))
        for prefix, res in resources.by_path().items():
            site.add_resource([prefix], res)

        credentials = None
        handoff = None
        protected: Any = site
        if keys is not None:
            credentials = KidIndexedCredentials(keys if isinstance(keys, KeyStore) else KeyStore(keys))
            protected = handoff = ContextHandoff(
                OscoreSiteWrapper(site, credentials), credentials, shared.ask_context, resources.end_observations_in
            )
            shared.on_context_asked = handoff.release
        root = DeregistrationWatch(protected)

        counters = Counters()
        containment = _contain_bad_utf8(asyncio.get_running_loop(), counters)
        context = await aiocoap.Context.create_server_context(
            root, bind=bind, transports=aiocoap_transports(transports), server_credentials=credentials
        )
        gateway = cls(service, context, the_store, resources, credentials, root, event_bus, counters, sweep_interval)
        gateway._containment = containment
        gateway.handoff = handoff
        granted = gateway.size_socket_buffers(udp_buffer)
        gateway.send_guard = icmp.install(gateway._udp_transport())
        gateway.duplicates = DuplicateCache(gateway._udp_message_manager(), exchange_lifetime)
        log.debug("udp socket buffers: asked %d, granted %d", udp_buffer, granted)
        resources.inbox.on_owner_gone = gateway._inbox_watch_lost
        gateway._tasks.append(asyncio.create_task(gateway._sweeper()))
        log.info("gateway serving %s on udp %s:%d", ", ".join(service.domains), bind[0], gateway.port)
        return gateway

    @property
    def presence(self) -> PresenceResource:
        return self.resources.presence

    @property
    def inbox(self) -> InboxResource:
        return self.resources.inbox

    def _udp_message_manager(self) -> Any:
        """aiocoap's MessageManager of the UDP transport (retransmissions, duplicates)."""
        for interface in self.context.request_interfaces:
            message_manager = getattr(interface, "token_interface", None)
            transport = getattr(getattr(message_manager, "message_interface", None), "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None and sock.type == socket.SOCK_DGRAM:
                return message_manager
        raise RuntimeError("no UDP transport bound")

    def _udp_transport(self) -> Any:
        return self._udp_message_manager().message_interface.transport

    def _udp_socket(self) -> socket.socket:
        return cast(socket.socket, self._udp_transport().get_extra_info("socket"))

    @property
    def port(self) -> int:
        return int(self._udp_socket().getsockname()[1])

    def size_socket_buffers(self, size: int) -> int:
        """Give the UDP socket ``size`` bytes of receive and send buffer (the kernel caps
        it at net.core.rmem_max / wmem_max). A burst of notifications to many watchers
        brings a burst of ACKs back; with the default ~200 KB the kernel drops many of
        them and every dropped ACK costs a retransmission 2-3 s later. Returns the
        receive buffer the kernel granted."""
        sock = self._udp_socket()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    async def _inbox_watch_lost(self, user: UserId, peer: str | None) -> None:
        """The last inbox observation by a principal's own device ended: notifications
        failed (RST, ICMP error or retransmission give-up), so it is out of contact until
        it publishes again. Not so when the device deregistered (RFC 7641 3.6), or
        observes again (with a new token) or speaks within the grace period."""
        ended = asyncio.get_running_loop().time()
        await asyncio.sleep(self.link_loss_grace)
        if peer is not None and self.deregistrations.deregistered_since(peer, ended - 1.0):
            return
        if self.inbox.owner_is_observing(user):
            return
        heard = self.resources.last_heard.get(user)
        if heard is not None and heard > ended:
            return
        try:
            if await self.service.mark_out_of_contact(user, only_if_expired=False):
                self.counters.out_of_contact_by_link_loss += 1
        except Exception:
            log.exception("marking %s out of contact failed", user)

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.service.sweep()
                if self.credentials is not None:
                    for user in self.credentials.revoked_owners():
                        ended = self.resources.end_observations_of(user, "credentials revoked")
                        log.info("credentials of %s revoked: ended %d observations", user, ended)
            except Exception:
                log.exception("sweep failed; retrying")
            await asyncio.sleep(self.sweep_interval)

    async def enable_federation(self, peers: Federation) -> None:
        """Serve users of other domains through their gateways (``gateway/federation.py``)."""
        await peers.start()
        self.federation = peers
        self.service.peers = peers
        self.presence.federation = peers
        self.presence.fan_in = FanIn(peers, self.presence.fan_in_updated)

    async def close(self) -> None:
        for res in self.resources.all():
            res.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.federation is not None:
            for request_id in list(self.presence.remote_observations):
                self.presence.drop_remote(request_id)
            if self.presence.fan_in is not None:
                self.presence.fan_in.close()
            await self.federation.close()
        await self.context.shutdown()
        await self.bus.close()
        if self.credentials is not None:
            self.credentials.close()
        await self.store.close()
        if self._containment is not None:
            self._containment.remove()
