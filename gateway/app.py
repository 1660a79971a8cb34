"""Assembly: store + service + CoAP site + timers, started and stopped as one gateway."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiocoap
from aiocoap import resource

from .coap.resources import CoapListener, InboxResource, OutboxResource, PresenceResource
from .core.ids import Domain, UserId
from .service import GatewayService
from .store import Store, open_store

log = logging.getLogger(__name__)

DEFAULT_PORT = 5683


@dataclass
class Counters:
    undecodable_datagrams: int = 0
    out_of_contact_by_link_loss: int = 0


class _ContainBadUtf8(logging.Filter):
    """aiocoap 0.4.17 logs a full traceback for each datagram whose string option is
    not UTF-8 (see aiocoap-notes): anyone able to send UDP could flood the log. Count
    such drops and log one line instead."""

    def __init__(self, counters: Counters) -> None:
        super().__init__()
        self.counters = counters

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UnicodeDecodeError):
            self.counters.undecodable_datagrams += 1
            if (
                self.counters.undecodable_datagrams in (1, 10, 100, 1000)
                or self.counters.undecodable_datagrams % 10000 == 0
            ):
                log.warning("dropped %d datagrams with non-UTF-8 options", self.counters.undecodable_datagrams)
            return False
        return True


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
    presence: PresenceResource
    inbox: InboxResource
    outbox: OutboxResource
    counters: Counters
    sweep_interval: float
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _log_filter: logging.Filter | None = None

    @classmethod
    async def start(
        cls,
        *,
        bind: tuple[str, int] = ("::", DEFAULT_PORT),
        store: str | Store = "sqlite:gateway.db",
        domains: Iterable[str] = ("example.org",),
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 1.0,
    ) -> Gateway:
        the_store = await open_store(store) if isinstance(store, str) else store
        service = GatewayService(the_store, [Domain(d.lower()) for d in domains], clock)
        presence_res = PresenceResource(service)
        inbox_res = InboxResource(service)
        outbox_res = OutboxResource(service)
        service.listener = CoapListener(presence_res, inbox_res, outbox_res)

        site = resource.Site()
        site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
        site.add_resource(["p"], presence_res)
        site.add_resource(["i"], inbox_res)
        site.add_resource(["o"], outbox_res)

        counters = Counters()
        log_filter = _ContainBadUtf8(counters)
        for name in ("coap-server", "coap"):
            logging.getLogger(name).addFilter(log_filter)
        context = await aiocoap.Context.create_server_context(site, bind=bind, transports=["udp6"])
        gateway = cls(service, context, the_store, presence_res, inbox_res, outbox_res, counters, sweep_interval)
        gateway._log_filter = log_filter
        inbox_res.on_last_observer_gone = gateway._inbox_watch_lost
        gateway._tasks.append(asyncio.create_task(gateway._sweeper()))
        log.info("gateway serving %s on udp %s:%d", ", ".join(service.domains), bind[0], gateway.port)
        return gateway

    @property
    def port(self) -> int:
        for interface in self.context.request_interfaces:
            message_interface = getattr(getattr(interface, "token_interface", None), "message_interface", None)
            local_port = getattr(message_interface, "_local_port", None)
            if local_port is not None:
                return int(local_port())
        raise RuntimeError("no UDP transport bound")

    async def _inbox_watch_lost(self, user: UserId) -> None:
        """A device's last inbox observation ended: its notifications failed (RST,
        ICMP error or retransmission give-up), so it is out of contact until it
        publishes again. A graceful goodbye is a presence DELETE before leaving."""
        try:
            if await self.service.mark_out_of_contact(user, only_if_expired=False):
                self.counters.out_of_contact_by_link_loss += 1
        except Exception:
            log.exception("marking %s out of contact failed", user)

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.service.sweep()
            except Exception:
                log.exception("sweep failed; retrying")
            await asyncio.sleep(self.sweep_interval)

    async def close(self) -> None:
        for res in (self.presence, self.inbox, self.outbox):
            res.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.context.shutdown()
        await self.store.close()
        if self._log_filter is not None:
            for name in ("coap-server", "coap"):
                logging.getLogger(name).removeFilter(self._log_filter)
