"""Deterministic emulation of lossy, slow and intermittent datagram links.

Theory of operation
===================

Two layers, as in sans-IO protocol stacks (aioquic, h11):

``LinkModel`` (pure)
    One direction of one device's link. ``submit(now, size)`` decides the fate
    of a datagram offered at time ``now`` and returns the times at which copies
    of it reach the far end: ``[]`` when it is dropped, one time normally, two
    when the network duplicates it. The clock is an argument and the only
    randomness is a private ``random.Random`` seeded at construction, so the
    same seed and the same sequence of ``submit`` calls give the same schedule
    on every machine and every run. ``now`` must never go backwards.

    A datagram passes these stages in order; the first that drops it is the
    cause counted:

    1. MTU: larger than ``mtu`` bytes (UDP payload) -> dropped. Nothing is
       fragmented: CoAP over UDP must fit one datagram (RFC 7252 section 4.6).
    2. Outage: ``now`` lies in a fixed window ``(start_s, end_s)`` or in the
       down part of the periodic outage -> dropped. Times are relative to
       ``start``, the moment the link came up.
    3. Transmit queue: with ``bandwidth_bps`` > 0 one transmitter serialises
       datagrams one after the other, each taking ``(size + overhead_bytes) *
       8 / bandwidth_bps`` seconds; a regulatory ``duty_cycle`` below 1 keeps
       it silent for ``airtime * (1 / duty_cycle - 1)`` after each one. Bytes
       not yet fully sent are the backlog; a datagram that would push the
       backlog over ``queue_bytes`` is tail-dropped.
    4. Channel loss: an independent Bernoulli loss, and a Gilbert-Elliott
       two-state Markov channel (good/bad, advanced once per offered datagram)
       for losses that come in bursts. A lost datagram still used its airtime,
       as a corrupted radio frame does.
    5. Delay: arrival = end of transmission + ``latency_s`` + uniform jitter
       in ``[0, jitter_s)``. The link is FIFO: jitter alone never reorders
       (an arrival is clamped to the previous in-order arrival), so
       reordering happens only where asked for: a datagram picked with
       probability ``reorder`` is held back ``reorder_delay_s`` more and later
       ones overtake it.
    6. Duplication: with probability ``duplicate`` a second copy arrives up to
       ``jitter_s`` after the first. Copies use no airtime.

    Every ``submit`` draws the same fixed number of random values, whatever
    happens to the datagram. Two links with the same seed and different
    settings therefore see the same random numbers datagram by datagram
    ("common random numbers"): turning on duplication does not reshuffle which
    datagrams are lost, and profiles can be compared side by side.

``UdpLinkRelay`` (asyncio shell)
    Moves real UDP datagrams on loopback and asks the models what to do. It
    listens on ``127.0.0.1:0``; devices send there instead of to the server.
    For each new device source address it creates that device's pair of
    models (uplink and downlink, own seeds derived from the relay seed and the
    order in which devices first appeared) and an upstream socket connected to
    the server, so the server sees one source port per device, as behind a
    NAT. Device -> server datagrams go through the uplink model, server ->
    device ones through the downlink model; each delivery is a
    ``loop.call_at`` timer. ``rebind(device)`` replaces the device's upstream
    socket, so the server sees the device's traffic arrive from a new port
    and its replies to the old port are lost, as after a NAT rebinding.
    ``NatParams`` adds periodic rebinding and a NAT idle timeout. The relay
    only moves datagrams and arms timers; every decision is in the models.

Not modelled: shared bottlenecks between devices (each device has its own
links), LoRaWAN receive windows and Iridium mailbox checks (approximated by
latency), ICMP, and datagrams in flight when an outage starts (the outage is
checked when the datagram is offered).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import hashlib
import ipaddress
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Address",
    "DropCause",
    "DuplexCounters",
    "DuplexLinkModel",
    "LinkCounters",
    "LinkModel",
    "LinkParams",
    "NatParams",
    "RelayStats",
    "UdpLinkRelay",
    "derive_seed",
]

_log = logging.getLogger(__name__)

Address = tuple[str, int]
"""A (host, port) pair; IPv6 scope and flow info are dropped."""

_MAX_UDP_PAYLOAD = 65_507  # IPv4: 65,535 - 20 (IP header) - 8 (UDP header)


def derive_seed(seed: int | str, *labels: object) -> int:
    """Derive a child seed from ``seed`` and ``labels``, stable across runs.

    Uses BLAKE2b, not ``hash()``, which is salted per process for strings.

    >>> derive_seed(1, "uplink") == derive_seed(1, "uplink")
    True
    >>> derive_seed(1, "uplink") != derive_seed(1, "downlink")
    True
    """
    text = repr((seed, *labels)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class LinkParams:
    """Settings of one direction of a link. The defaults are a perfect link.

    Probabilities are per datagram. ``mtu`` is the largest UDP payload that
    passes. ``outages`` are ``(start_s, end_s)`` windows, relative to link
    start, during which everything offered is dropped; ``periodic_outage`` is
    ``(period_s, down_s)``: the link is up for ``period_s - down_s``, then down
    for ``down_s``, and again.
    """

    loss: float = 0.0
    """Independent (Bernoulli) loss probability."""
    p_good_to_bad: float = 0.0
    """Gilbert-Elliott: chance per datagram that a good channel turns bad."""
    p_bad_to_good: float = 1.0
    """Gilbert-Elliott: chance per datagram that a bad channel recovers."""
    loss_in_good: float = 0.0
    """Gilbert-Elliott: loss probability while the channel is good."""
    loss_in_bad: float = 1.0
    """Gilbert-Elliott: loss probability while the channel is bad."""
    latency_s: float = 0.0
    """One-way propagation and processing delay, serialisation excluded."""
    jitter_s: float = 0.0
    """Extra delay, uniform in [0, jitter_s)."""
    bandwidth_bps: float = 0.0
    """Transmitter rate in bit/s; 0 means unlimited (no queue either)."""
    queue_bytes: int = 65_536
    """Transmit backlog limit, in wire bytes; used only with a bandwidth."""
    overhead_bytes: int = 0
    """Per-datagram bytes added on the wire (IP/UDP or link-layer headers)."""
    duty_cycle: float = 1.0
    """Fraction of time the transmitter may be on air (1.0 = no limit)."""
    duplicate: float = 0.0
    """Probability that a delivered datagram arrives twice."""
    reorder: float = 0.0
    """Probability that a datagram is held back so that later ones overtake it."""
    reorder_delay_s: float = 0.05
    """Extra delay of a held-back datagram."""
    mtu: int = _MAX_UDP_PAYLOAD
    """Largest UDP payload that passes; larger datagrams are dropped."""
    outages: Sequence[tuple[float, float]] = ()
    """Fixed outage windows (start_s, end_s), relative to link start."""
    periodic_outage: tuple[float, float] | None = None
    """(period_s, down_s): up for period_s - down_s, then down for down_s."""

    def __post_init__(self) -> None:
        for name in ("loss", "p_good_to_bad", "p_bad_to_good", "loss_in_good",
                     "loss_in_bad", "duplicate", "reorder"):
            _check_probability(name, getattr(self, name))
        for name in ("latency_s", "jitter_s", "bandwidth_bps", "reorder_delay_s"):
            _check_non_negative(name, getattr(self, name))
        if self.queue_bytes < 1 or self.overhead_bytes < 0:
            raise ValueError("queue_bytes must be >= 1 and overhead_bytes >= 0")
        if not 0.0 < self.duty_cycle <= 1.0:
            raise ValueError(f"duty_cycle must be in (0, 1], got {self.duty_cycle!r}")
        if self.mtu < 0:
            raise ValueError(f"mtu must be >= 0, got {self.mtu!r}")
        windows = tuple((float(start), float(end)) for start, end in self.outages)
        for start, end in windows:
            if not (0.0 <= start < end):
                raise ValueError(f"outage window must satisfy 0 <= start < end, got {(start, end)}")
        # Frozen, so normalise through object.__setattr__: a list given by the
        # caller becomes a tuple and the params stay hashable.
        object.__setattr__(self, "outages", windows)
        if self.periodic_outage is not None:
            period, down = (float(x) for x in self.periodic_outage)
            if not (period > 0.0 and 0.0 <= down <= period):
                raise ValueError(f"periodic_outage needs period > 0 and 0 <= down <= period, "
                                 f"got {self.periodic_outage!r}")
            object.__setattr__(self, "periodic_outage", (period, down))

    def expected_loss_rate(self) -> float:
        """Long-run fraction of datagrams lost on the channel (stage 4 only).

        Uses the stationary distribution of the Gilbert-Elliott chain:
        P(bad) = p_good_to_bad / (p_good_to_bad + p_bad_to_good).
        """
        transitions = self.p_good_to_bad + self.p_bad_to_good
        p_bad = self.p_good_to_bad / transitions if transitions > 0 else 0.0
        burst_loss = (1.0 - p_bad) * self.loss_in_good + p_bad * self.loss_in_bad
        return 1.0 - (1.0 - self.loss) * (1.0 - burst_loss)


class DropCause(enum.Enum):
    """Why a datagram did not arrive, in the order the stages are checked."""

    MTU = "mtu"
    OUTAGE = "outage"
    QUEUE = "queue"
    LOSS = "loss"


def _zero_per_cause() -> dict[DropCause, int]:
    return {cause: 0 for cause in DropCause}


@dataclass(slots=True)
class LinkCounters:
    """What one direction did. ``delivered_*`` counts arrivals, copies included.

    Invariant: ``offered_datagrams == delivered_datagrams -
    duplicated_datagrams + dropped_total``.
    """

    offered_datagrams: int = 0
    offered_bytes: int = 0
    delivered_datagrams: int = 0
    delivered_bytes: int = 0
    duplicated_datagrams: int = 0
    dropped_datagrams: dict[DropCause, int] = field(default_factory=_zero_per_cause)
    dropped_bytes: dict[DropCause, int] = field(default_factory=_zero_per_cause)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped_datagrams.values())

    @property
    def drop_rate(self) -> float:
        """Fraction of offered datagrams that did not arrive (0.0 when none offered)."""
        return self.dropped_total / self.offered_datagrams if self.offered_datagrams else 0.0

    def copy(self) -> LinkCounters:
        return LinkCounters(
            self.offered_datagrams, self.offered_bytes, self.delivered_datagrams,
            self.delivered_bytes, self.duplicated_datagrams,
            dict(self.dropped_datagrams), dict(self.dropped_bytes),
        )

    @classmethod
    def combined(cls, parts: Iterable[LinkCounters]) -> LinkCounters:
        """Totals over several links (e.g. all devices of a relay)."""
        total = cls()
        for part in parts:
            total.offered_datagrams += part.offered_datagrams
            total.offered_bytes += part.offered_bytes
            total.delivered_datagrams += part.delivered_datagrams
            total.delivered_bytes += part.delivered_bytes
            total.duplicated_datagrams += part.duplicated_datagrams
            for cause in DropCause:
                total.dropped_datagrams[cause] += part.dropped_datagrams[cause]
                total.dropped_bytes[cause] += part.dropped_bytes[cause]
        return total


class LinkModel:
    """One direction of one link; see the module docstring for the stages."""

    __slots__ = (
        "_backlog_bytes",
        "_channel_bad",
        "_counters",
        "_in_transmission",
        "_last_in_order_arrival",
        "_last_now",
        "_params",
        "_random",
        "_start",
        "_transmitter_free_at",
    )

    def __init__(self, params: LinkParams, seed: int | str, *, start: float = 0.0) -> None:
        self._params = params
        self._random = random.Random(seed)  # never the global generator
        self._start = start
        self._last_now = -math.inf
        self._channel_bad = False  # Gilbert-Elliott chain starts in the good state
        self._transmitter_free_at = -math.inf
        # (time the last bit leaves, wire bytes) per datagram not fully sent;
        # end times only grow, so expired entries are always at the left.
        self._in_transmission: collections.deque[tuple[float, int]] = collections.deque()
        self._backlog_bytes = 0
        self._last_in_order_arrival = -math.inf
        self._counters = LinkCounters()

    @property
    def params(self) -> LinkParams:
        return self._params

    @property
    def start(self) -> float:
        return self._start

    @property
    def counters(self) -> LinkCounters:
        """A snapshot; later submits do not change it."""
        return self._counters.copy()

    def in_outage(self, now: float) -> bool:
        """Whether a datagram offered at ``now`` falls in an outage."""
        since_start = now - self._start
        for window_start, window_end in self._params.outages:
            if window_start <= since_start < window_end:
                return True
        if self._params.periodic_outage is not None:
            period, down = self._params.periodic_outage
            if down > 0.0 and since_start >= 0.0 and since_start % period >= period - down:
                return True
        return False

    def backlog_bytes(self, now: float) -> int:
        """Wire bytes queued or being sent at ``now`` (0 without a bandwidth limit)."""
        self._expire_sent(now)
        return self._backlog_bytes

    def submit(self, now: float, size: int) -> list[float]:
        """Offer a datagram of ``size`` bytes at ``now``; return its arrival times."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if now < self._last_now:
            raise ValueError(f"time went backwards: {now} < {self._last_now}")
        self._last_now = now
        params = self._params
        counters = self._counters
        counters.offered_datagrams += 1
        counters.offered_bytes += size

        # Always the same draws in the same order (common random numbers).
        draw = self._random.random
        u_transition, u_burst_loss, u_loss = draw(), draw(), draw()
        u_jitter, u_reorder, u_duplicate, u_duplicate_jitter = draw(), draw(), draw(), draw()

        # The channel evolves with every datagram offered, even ones dropped
        # before reaching it: bursts are a property of the radio, not of us.
        if self._channel_bad:
            self._channel_bad = not u_transition < params.p_bad_to_good
        else:
            self._channel_bad = u_transition < params.p_good_to_bad

        if size > params.mtu:
            return self._drop(DropCause.MTU, size)
        if self.in_outage(now):
            return self._drop(DropCause.OUTAGE, size)
        sent_at = self._transmit(now, size)
        if sent_at is None:
            return self._drop(DropCause.QUEUE, size)
        burst_loss = params.loss_in_bad if self._channel_bad else params.loss_in_good
        if u_burst_loss < burst_loss or u_loss < params.loss:
            return self._drop(DropCause.LOSS, size)

        arrival = sent_at + params.latency_s + params.jitter_s * u_jitter
        if u_reorder < params.reorder:
            arrival += params.reorder_delay_s  # not clamped: later datagrams overtake it
        else:
            arrival = max(arrival, self._last_in_order_arrival)
            self._last_in_order_arrival = arrival
        arrivals = [arrival]
        if u_duplicate < params.duplicate:
            arrivals.append(arrival + params.jitter_s * u_duplicate_jitter)
            counters.duplicated_datagrams += 1
        counters.delivered_datagrams += len(arrivals)
        counters.delivered_bytes += size * len(arrivals)
        return arrivals

    def _drop(self, cause: DropCause, size: int) -> list[float]:
        self._counters.dropped_datagrams[cause] += 1
        self._counters.dropped_bytes[cause] += size
        return []

    def _expire_sent(self, now: float) -> None:
        while self._in_transmission and self._in_transmission[0][0] <= now:
            self._backlog_bytes -= self._in_transmission.popleft()[1]

    def _transmit(self, now: float, size: int) -> float | None:
        """Queue the datagram on the transmitter; return when its last bit is sent."""
        params = self._params
        if params.bandwidth_bps <= 0.0:
            return now
        self._expire_sent(now)
        wire_bytes = size + params.overhead_bytes
        if self._backlog_bytes + wire_bytes > params.queue_bytes:
            return None  # tail drop: the queue keeps what it already holds
        airtime = wire_bytes * 8.0 / params.bandwidth_bps
        sent_at = max(now, self._transmitter_free_at) + airtime
        # A duty-cycle limit (e.g. 1 % in EU 868 MHz sub-bands) obliges the
        # radio to stay silent for 99x its airtime before sending again.
        self._transmitter_free_at = sent_at + airtime * (1.0 / params.duty_cycle - 1.0)
        self._in_transmission.append((sent_at, wire_bytes))
        self._backlog_bytes += wire_bytes
        return sent_at


@dataclass(frozen=True, slots=True)
class DuplexCounters:
    uplink: LinkCounters
    downlink: LinkCounters


class DuplexLinkModel:
    """A device's two directions, each a ``LinkModel`` with its own derived seed.

    Separate seeds keep the directions independent, and adding traffic in
    one direction never changes the random numbers the other one sees.
    """

    __slots__ = ("downlink", "uplink")

    def __init__(self, uplink: LinkParams, downlink: LinkParams, seed: int | str,
                 *, start: float = 0.0) -> None:
        self.uplink = LinkModel(uplink, derive_seed(seed, "uplink"), start=start)
        self.downlink = LinkModel(downlink, derive_seed(seed, "downlink"), start=start)

    @property
    def counters(self) -> DuplexCounters:
        return DuplexCounters(self.uplink.counters, self.downlink.counters)


@dataclass(frozen=True, slots=True)
class NatParams:
    """NAT behaviour between the devices and the server (``None`` = never).

    ``rebind_interval_s``: every device gets a new public port this often
    (carrier-grade NATs and mobile handovers do this).
    ``idle_timeout_s``: a binding with no outbound (device -> server) datagram
    for this long expires; server datagrams to it are dropped and the next
    uplink datagram opens a new binding. RFC 4787 (REQ-5) asks for at least
    2 minutes, but many deployed NATs use much less.
    """

    rebind_interval_s: float | None = None
    idle_timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("rebind_interval_s", "idle_timeout_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be None or > 0, got {value!r}")


@dataclass(slots=True)
class RelayStats:
    """Relay events that are not link-model decisions."""

    devices: int = 0
    bindings_opened: int = 0
    rebinds: int = 0
    """Explicit and periodic rebinds."""
    nat_idle_expiries: int = 0
    nat_expired_drops: int = 0
    """Server -> device datagrams dropped because the device's binding had expired."""
    binding_errors: int = 0
    socket_errors: int = 0
    """Errors reported by the sockets (e.g. ICMP port unreachable on loopback)."""


def _require_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the relay takes literal loopback addresses only, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the relay only talks to loopback addresses, got {host!r}")
    return host


def _address(raw: Any) -> Address:
    return (str(raw[0]), int(raw[1]))


class _DeviceSession:
    """One device as seen by the relay: its links and its NAT binding."""

    __slots__ = (
        "device_address",
        "generation",
        "index",
        "last_outbound",
        "links",
        "opening",
        "pending_uplink",
        "rebind_timer",
        "upstream",
        "upstream_protocol",
    )

    def __init__(self, device_address: Address, index: int, links: DuplexLinkModel,
                 now: float) -> None:
        self.device_address = device_address
        self.index = index
        self.links = links
        self.upstream: asyncio.DatagramTransport | None = None
        self.upstream_protocol: _UpstreamProtocol | None = None
        self.opening: asyncio.Task[None] | None = None
        # Bumped whenever the binding is dropped, so that a socket that
        # finishes opening after a newer rebind is recognised as stale.
        self.generation = 0
        self.pending_uplink: collections.deque[bytes] = collections.deque(maxlen=256)
        self.last_outbound = now
        self.rebind_timer: asyncio.TimerHandle | None = None


class _DeviceSideProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpLinkRelay) -> None:
        self._relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._relay._on_device_datagram(data, _address(addr))

    def error_received(self, exc: Exception) -> None:
        self._relay._stats.socket_errors += 1


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpLinkRelay, session: _DeviceSession) -> None:
        self._relay = relay
        self._session = session

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._relay._on_server_datagram(self._session, self, data)

    def error_received(self, exc: Exception) -> None:
        self._relay._stats.socket_errors += 1


class UdpLinkRelay:
    """Relays UDP between devices and one server through per-device link models.

    Devices send to ``address``; the server sees each device from its own
    loopback port (``upstream_address(device)``). No privileges needed.

    The relay's clock is ``loop.time()``; the models' outage windows count
    from ``start()``. Device ``n`` (in order of first datagram) gets models
    seeded with ``derive_seed(seed, "device", n)``, so a run that starts its
    devices in the same order replays the same link behaviour.
    """

    def __init__(self, server_address: Address, uplink: LinkParams, downlink: LinkParams,
                 *, seed: int | str = 0, nat: NatParams | None = None) -> None:
        host, port = server_address
        self._server_address: Address = (_require_loopback(host), int(port))
        self._uplink_params = uplink
        self._downlink_params = downlink
        self._seed = seed
        self._nat = nat if nat is not None else NatParams()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._device_side: asyncio.DatagramTransport | None = None
        self._sessions: dict[Address, _DeviceSession] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._started_at = 0.0
        self._closed = False
        self._stats = RelayStats()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("relay already started")
        self._loop = asyncio.get_running_loop()
        self._started_at = self._loop.time()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _DeviceSideProtocol(self), local_addr=("127.0.0.1", 0))
        self._device_side = transport

    async def close(self) -> None:
        """Stop relaying; datagrams still scheduled are discarded."""
        if self._closed:
            return
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        opening: list[asyncio.Task[None]] = []
        for session in self._sessions.values():
            if session.rebind_timer is not None:
                session.rebind_timer.cancel()
            if session.opening is not None:
                opening.append(session.opening)
            self._drop_binding(session)
        if opening:
            await asyncio.gather(*opening, return_exceptions=True)
        if self._device_side is not None:
            self._device_side.close()

    async def __aenter__(self) -> UdpLinkRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- observation -------------------------------------------------------

    @property
    def address(self) -> Address:
        """Where devices send to (the relay's device side)."""
        if self._device_side is None:
            raise RuntimeError("relay not started")
        return _address(self._device_side.get_extra_info("sockname"))

    @property
    def server_address(self) -> Address:
        return self._server_address

    @property
    def devices(self) -> tuple[Address, ...]:
        """Device addresses in the order they first sent."""
        return tuple(self._sessions)

    def upstream_address(self, device: Address) -> Address | None:
        """The source address the server currently sees for ``device``."""
        session = self._session(device)
        if session.upstream is None:
            return None
        return _address(session.upstream.get_extra_info("sockname"))

    def device_counters(self, device: Address) -> DuplexCounters:
        return self._session(device).links.counters

    @property
    def uplink_counters(self) -> LinkCounters:
        """Device -> server, all devices together."""
        return LinkCounters.combined(s.links.uplink.counters for s in self._sessions.values())

    @property
    def downlink_counters(self) -> LinkCounters:
        """Server -> device, all devices together."""
        return LinkCounters.combined(s.links.downlink.counters for s in self._sessions.values())

    @property
    def stats(self) -> RelayStats:
        """A snapshot of the relay's own counters."""
        return dataclasses.replace(self._stats)

    # -- NAT control -------------------------------------------------------

    def rebind(self, device: Address) -> None:
        """Give ``device`` a new upstream port, as a NAT rebinding would.

        Server datagrams to the old port are lost; the device's next datagrams
        reach the server from the new one. Raises ``KeyError`` for a device
        that never sent anything.
        """
        session = self._session(device)
        self._stats.rebinds += 1
        self._drop_binding(session)
        self._ensure_binding(session)

    # -- internals ---------------------------------------------------------

    def _session(self, device: Address) -> _DeviceSession:
        try:
            return self._sessions[_address(device)]
        except KeyError:
            raise KeyError(f"unknown device {device!r}") from None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "relay not started"
        return self._loop

    def _schedule(self, when: float, action: Callable[[], None]) -> None:
        loop = self._running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            action()

        handle = loop.call_at(when, fire)
        self._timers.add(handle)

    def _on_device_datagram(self, data: bytes, device: Address) -> None:
        if self._closed:
            return
        loop = self._running_loop()
        now = loop.time()
        known = self._sessions.get(device)
        session = known if known is not None else self._new_session(device, now)
        for when in session.links.uplink.submit(now, len(data)):
            self._schedule(when, functools.partial(self._deliver_uplink, session, data))

    def _new_session(self, device: Address, now: float) -> _DeviceSession:
        index = len(self._sessions)
        links = DuplexLinkModel(self._uplink_params, self._downlink_params,
                                derive_seed(self._seed, "device", index), start=self._started_at)
        session = _DeviceSession(device, index, links, now)
        self._sessions[device] = session
        self._stats.devices += 1
        self._ensure_binding(session)
        if self._nat.rebind_interval_s is not None:
            self._arm_periodic_rebind(session, self._nat.rebind_interval_s)
        return session

    def _arm_periodic_rebind(self, session: _DeviceSession, interval: float) -> None:
        def rebind_now() -> None:
            if self._closed:
                return
            self.rebind(session.device_address)
            self._arm_periodic_rebind(session, interval)

        session.rebind_timer = self._running_loop().call_later(interval, rebind_now)

    def _binding_expired(self, session: _DeviceSession, now: float) -> bool:
        timeout = self._nat.idle_timeout_s
        return timeout is not None and now - session.last_outbound > timeout

    def _deliver_uplink(self, session: _DeviceSession, data: bytes) -> None:
        if self._closed:
            return
        now = self._running_loop().time()
        if self._binding_expired(session, now) and session.upstream is not None:
            self._stats.nat_idle_expiries += 1
            self._drop_binding(session)
        session.last_outbound = now
        if session.upstream is not None:
            session.upstream.sendto(data)
        else:
            # Socket still opening (first datagram, or just rebound): hold the
            # datagram for the microseconds that takes rather than lose it.
            session.pending_uplink.append(data)
            self._ensure_binding(session)

    def _on_server_datagram(self, session: _DeviceSession, protocol: _UpstreamProtocol,
                            data: bytes) -> None:
        if self._closed or protocol is not session.upstream_protocol:
            return  # a socket from an older binding
        loop = self._running_loop()
        now = loop.time()
        if self._binding_expired(session, now):
            # The NAT forgot this mapping: the datagram dies at the NAT and the
            # device will get a new port with its next outbound datagram.
            self._stats.nat_idle_expiries += 1
            self._stats.nat_expired_drops += 1
            self._drop_binding(session)
            return
        for when in session.links.downlink.submit(now, len(data)):
            self._schedule(when, functools.partial(self._deliver_downlink, session, data))

    def _deliver_downlink(self, session: _DeviceSession, data: bytes) -> None:
        if self._closed or self._device_side is None:
            return
        self._device_side.sendto(data, session.device_address)

    def _ensure_binding(self, session: _DeviceSession) -> None:
        if self._closed or session.upstream is not None or session.opening is not None:
            return
        session.opening = self._running_loop().create_task(
            self._open_binding(session, session.generation))

    def _drop_binding(self, session: _DeviceSession) -> None:
        session.generation += 1
        if session.opening is not None:
            session.opening.cancel()
            session.opening = None
        if session.upstream is not None:
            session.upstream.close()
        session.upstream = None
        session.upstream_protocol = None

    async def _open_binding(self, session: _DeviceSession, generation: int) -> None:
        loop = self._running_loop()
        bind_host = "::1" if ":" in self._server_address[0] else "127.0.0.1"
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self, session),
                local_addr=(bind_host, 0), remote_addr=self._server_address)
        except OSError:
            _log.exception("opening upstream socket for %s failed", session.device_address)
            self._stats.binding_errors += 1
            if session.generation == generation:
                session.opening = None
            return
        if self._closed or session.generation != generation:
            transport.close()  # superseded by a newer rebind (or by close)
            return
        session.opening = None
        session.upstream = transport
        session.upstream_protocol = protocol
        self._stats.bindings_opened += 1
        while session.pending_uplink:
            transport.sendto(session.pending_uplink.popleft())
