"""Many simulated devices, each on its own lossy, slow, intermittent link, against one gateway.

Theory of operation
===================

Everything runs in one asyncio loop on loopback: the gateway (in-process, unless an
external one is named), and for every device

- its own OSCORE context, provisioned in the gateway's :class:`~gateway.keys.KeyStore`;
- its own :class:`CountingRelay` (a :class:`~device_sim.link.UdpLinkRelay` seeded with
  ``derive_seed(seed, "link", index)``): the device talks to the relay, the relay to the
  gateway, through the uplink and downlink models of the chosen profile, plus any
  outage windows of the device's :class:`~device_sim.scenarios.DeviceSpec`;
- its own aiocoap client context (:class:`~device_sim.client.DeviceClient`) with the
  profile's CoAP transmission parameters (ACK_TIMEOUT, ACK_RANDOM_FACTOR,
  MAX_RETRANSMIT) set per message, and every request wrapped in a timeout
  (aiocoap has none, #396): MAX_TRANSMIT_WAIT plus the profile's longest round trip
  unless told otherwise;
- a private ``random.Random`` (``derive_seed(seed, "device", index)``) for start times,
  traffic, message ids and payload lengths.

Time is the loop's clock; a run starts at ``t0`` and every time in the plan and the
results is seconds since ``t0`` (the relays' outage windows are aligned to ``t0``).
The seed fixes the plan, the link models' random numbers and the traffic, but not the
interleaving of real sockets and timers, so two runs with one seed agree closely, not
bit for bit.

A run has two phases. Traffic: for ``duration`` seconds (or until every device with a
finite plan is done) devices chat, churn, sleep and vanish as their roles say. Drain:
no new IMs or presence changes; in-flight IMs are still resent, sleepy devices still
wake, keep-alives continue; it ends when every accepted IM reached its recipient's
application, nothing is in flight and every watcher of a vanished device saw it out of
contact, or after ``drain`` seconds.

How devices stay robust (what a real device on such a link must do):

- Inbox: Observe ``/i/me`` and treat every notification as "something changed": take
  messages with seq above the highest already handed to the application (the cursor),
  fetch the rest with ``?c=cursor`` while ``more``, then acknowledge the cursor.
- Observations can die silently: a notification give-up, or a NAT rebinding (the
  gateway keeps sending to the old port). So every ``refresh`` seconds the device
  polls what it observes (``GET /i/me?c=cursor``; ``GET /p/x`` with the ETag of the
  newest version seen, 2.03 when unchanged). A poll also delivers what it finds. When
  a poll found news and no notification follows within ``grace`` seconds, the
  observation is presumed dead and registered again (RFC 7641 3.3.1); so is any
  observation that failed. Re-registering only on evidence matters with aiocoap
  0.4.17: cancelling an OSCORE client observation does not end the inner one (the
  OSCORE transport keeps iterating it, #13 / "no way yet to cancel observations"),
  so the client keeps acknowledging its notifications and the gateway keeps the
  subscription; a periodic blind re-registration would pile up such zombies.
- Presence: publish with a lease, republish every ``lease / 2`` (keep-alive), each
  publish with a unique note so watchers' sightings can be matched to publishes.
- IMs: a unique 8-byte id per IM; on a timeout or retransmission give-up the same IM
  (same id, same bytes) is sent again until a 2.01, so the gateway stores it once.

What is measured is described in :mod:`device_sim.report`. Bytes on the air come from
the relays' link counters (UDP payloads, plus the profile's per-datagram overhead);
a retransmission is a datagram byte-identical to one already offered in the same
direction (CoAP retransmits CONs and the deduplication cache re-sends responses
unchanged), so retransmissions = offered - unique.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import math
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import aiocoap.error
from aiocoap import Code

from gateway.app import Gateway
from gateway.coap.loop_errors import ContainedLoopErrors, raised_in
from gateway.core import codec
from gateway.core.errors import GatewayError
from gateway.core.ids import UserId, parse_user_id
from gateway.core.model import MessageId, PresenceDocument, QueuedMessage, Status, UserRecord
from gateway.keys import KeyStore

from .client import DeviceClient, RequestFailed, transport_tuning
from .link import Address, LinkParams, NatParams, UdpLinkRelay, _DeviceSession, _UpstreamProtocol, derive_seed
from .profiles import LinkProfile, get_profile, profile_names
from .report import LinkReport, Recorder, headline, plot, summarise
from .scenarios import DeviceSpec, Role, plan_fleet

__all__ = [
    "CountingRelay",
    "Fleet",
    "FleetConfig",
    "SimDevice",
    "Timing",
    "Tuning",
    "local_gateway",
    "run_cli",
    "run_fleet",
]

log = logging.getLogger(__name__)

# Failures a device rides out by trying again: timeouts (ours), aiocoap's network
# errors (retransmission give-up, ICMP errors, shutdown), socket errors, and a body
# it could not decode.
TRANSIENT: tuple[type[BaseException], ...] = (TimeoutError, aiocoap.error.Error, OSError, GatewayError)
# ... and, for everything but IMs, an error response (tried again later).
RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT, RequestFailed)


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tuning:
    """CoAP transmission parameters of the devices (RFC 7252 4.8) and their request timeout."""

    ack_timeout: float
    max_retransmit: int
    ack_random_factor: float = 1.5
    request_timeout: float | None = None
    """Seconds before a request is abandoned; None: MAX_TRANSMIT_WAIT + 1 s."""

    @classmethod
    def from_profile(cls, profile: LinkProfile) -> Tuning:
        longest_rtt = profile.rtt_bounds_s()[1]
        return cls(
            profile.ack_timeout,
            profile.max_retransmit,
            profile.ack_random_factor,
            request_timeout=round(profile.max_transmit_wait + longest_rtt + 1.0, 3),
        )

    @property
    def max_transmit_wait(self) -> float:
        return self.ack_timeout * ((1 << (self.max_retransmit + 1)) - 1) * self.ack_random_factor

    @property
    def timeout(self) -> float:
        return self.request_timeout if self.request_timeout is not None else self.max_transmit_wait + 1.0


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """A run. ``None`` fields are derived from the duration and the profile (:meth:`timing`)."""

    profile: LinkProfile
    duration: float
    seed: int = 0
    tuning: Tuning | None = None
    lease: int | None = None
    """Presence lease in seconds (the gateway counts whole seconds)."""
    keepalive: float | None = None
    refresh: float | None = None
    """Poll each observed resource this often, to find out whether its observation still works."""
    grace: float | None = None
    """After a poll found news, a notification must follow within this, or the
    observation is presumed dead and registered again."""
    wake_interval: float | None = None
    drain: float | None = None
    im_interval: float = 4.0
    """Mean seconds between IMs of one chat device (Poisson)."""
    churn_interval: float = 5.0
    sleepy_every: int = 4
    """A chat device sends every n-th IM to a sleepy device."""
    start_spread: float | None = None
    nat: NatParams | None = None
    domain: str = "example.org"
    name_prefix: str = ""

    def device_tuning(self) -> Tuning:
        return self.tuning if self.tuning is not None else Tuning.from_profile(self.profile)

    def timing(self) -> Timing:
        lease = self.lease if self.lease is not None else max(2, min(300, round(self.duration / 3)))
        wake = self.wake_interval if self.wake_interval is not None else max(1.0, min(60.0, self.duration / 3))
        keepalive = self.keepalive if self.keepalive is not None else lease / 2
        refresh = self.refresh if self.refresh is not None else float(lease)
        longest_rtt = self.profile.rtt_bounds_s()[1]
        # A lost notification is retransmitted by the gateway after at most
        # ACK_TIMEOUT x ACK_RANDOM_FACTOR = 3 s (aiocoap's defaults, which a server uses).
        grace = self.grace if self.grace is not None else 2 * longest_rtt + 3.0
        # Long enough for a sleepy device's next wake, a lease to run out and an
        # observation to be re-registered (which also polls) after the traffic ends.
        settle = 2 * longest_rtt + 2.0
        drain = self.drain if self.drain is not None else max(10.0, wake + settle, lease + 5.0, refresh + grace)
        spread = self.start_spread if self.start_spread is not None else min(2.0, self.duration / 10)
        return Timing(
            lease=lease,
            sleepy_lease=max(lease, math.ceil(2 * wake) + 1),
            keepalive=keepalive,
            refresh=refresh,
            grace=grace,
            wake_interval=wake,
            drain=drain,
            start_spread=spread,
            request_timeout=self.device_tuning().timeout,
        )

    def describe(self, devices: int) -> dict[str, Any]:
        return {
            "devices": devices,
            "profile": self.profile.name,
            "duration_s": self.duration,
            "seed": self.seed,
            "tuning": asdict(self.device_tuning()),
            "timing": asdict(self.timing()),
            "im_interval_s": self.im_interval,
            "churn_interval_s": self.churn_interval,
            "nat": None if self.nat is None else asdict(self.nat),
        }


@dataclass(frozen=True, slots=True)
class Timing:
    lease: int
    sleepy_lease: int
    keepalive: float
    refresh: float
    grace: float
    wake_interval: float
    drain: float
    start_spread: float
    request_timeout: float


# -- link ------------------------------------------------------------------------------


def _etag(version: int) -> bytes:
    """The gateway's ETag of a presence version: minimal big-endian (docs/protocol.md section 4)."""
    return version.to_bytes(max(1, (version.bit_length() + 7) // 8), "big")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=12).digest()


class CountingRelay(UdpLinkRelay):
    """A relay for one device that also counts the distinct datagrams offered per
    direction, can align its link clock to the start of a run, and can go dark (the
    device vanished: its datagrams never reach the air)."""

    def __init__(
        self, server_address: Address, uplink: LinkParams, downlink: LinkParams, *, seed: int | str = 0,
        nat: NatParams | None = None,
    ) -> None:
        super().__init__(server_address, uplink, downlink, seed=seed, nat=nat)
        self.unique_up: set[bytes] = set()
        self.unique_down: set[bytes] = set()
        self.dark = False

    def align_start(self, start: float) -> None:
        """Count outage windows from ``start`` (loop time). Only before any datagram."""
        if self.devices:
            raise RuntimeError("align_start after traffic began")
        self._started_at = start

    def go_dark(self) -> None:
        self.dark = True

    def _on_device_datagram(self, data: bytes, device: Address) -> None:
        if self.dark:
            return
        before = self.uplink_counters.offered_datagrams
        super()._on_device_datagram(data, device)
        if self.uplink_counters.offered_datagrams > before:
            self.unique_up.add(_digest(data))

    def _on_server_datagram(self, session: _DeviceSession, protocol: _UpstreamProtocol, data: bytes) -> None:
        before = self.downlink_counters.offered_datagrams
        super()._on_server_datagram(session, protocol, data)
        if self.downlink_counters.offered_datagrams > before:
            self.unique_down.add(_digest(data))


# -- devices ---------------------------------------------------------------------------


def _release_contexts(client: DeviceClient) -> None:
    """Persist the client's OSCORE sequence numbers and release its context locks now
    (aiocoap would do it when the objects are collected, maybe after the directory is gone)."""
    for credential in list(client.context.client_credentials.values()):
        if getattr(credential, "lockfile", None) is not None and hasattr(credential, "_destroy"):
            credential._destroy()


class SimDevice:
    """One simulated device carrying out its :class:`DeviceSpec`."""

    def __init__(
        self,
        fleet: Fleet,
        spec: DeviceSpec,
        index: int,
        user: UserId,
        relay: CountingRelay,
        client: DeviceClient,
    ) -> None:
        self.fleet = fleet
        self.spec = spec
        self.index = index
        self.user = user
        self.relay = relay
        self.client = client
        self.rng = random.Random(derive_seed(fleet.config.seed, "device", index))
        self.timing = fleet.timing
        self.recorder = fleet.recorder
        self.handled = 0  # highest inbox seq handed to the application (the cursor)
        self.acked = 0
        self.generating = spec.sends_ims or spec.role is Role.CHURN or spec.vanish_at is not None
        self.gone = False
        self._publishes = 0
        self._ims = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # plumbing ------------------------------------------------------------------------

    def now(self) -> float:
        return self.fleet.now()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro))

    async def _sleep_until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))

    def _backoff(self, attempt: int) -> float:
        base = self.fleet.tuning.ack_timeout
        return min(base * 2.0 ** min(attempt, 6), max(base * 4, 2.0)) * self.rng.uniform(0.5, 1.0)

    def _transient(self, what: str, exc: BaseException) -> None:
        self.recorder.error(f"{what}: {type(exc).__name__}")

    @property
    def traffic_over(self) -> bool:
        return self.now() >= self.fleet.traffic_end

    def start(self) -> None:
        delay = self.rng.uniform(0.0, self.timing.start_spread)
        if self.spec.observes_inbox:
            self._spawn(self._inbox_loop(delay))
        for name in self.spec.watches:
            presentity = self.fleet.user_of(name)
            self.recorder.watching(self.user, presentity)
            self._spawn(self._watch_loop(presentity, delay))
        if self.spec.role is Role.SLEEPY:
            self._spawn(self._sleepy_loop())
        elif self.spec.publishes:
            self._spawn(self._presence_loop(delay))
        if self.spec.sends_ims:
            self._spawn(self._chat_loop(delay))

    async def stop(self) -> None:
        """Stop without goodbye: cancel everything, close the client's sockets."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()
        _release_contexts(self.client)

    def link_report(self) -> LinkReport:
        up = self.relay.uplink_counters
        down = self.relay.downlink_counters
        profile = self.fleet.config.profile
        return LinkReport(
            device=self.user,
            role=self.spec.role.value,
            up_datagrams=up.offered_datagrams,
            up_bytes=up.offered_bytes,
            up_unique=len(self.relay.unique_up),
            up_delivered=up.delivered_datagrams - up.duplicated_datagrams,
            down_datagrams=down.offered_datagrams,
            down_bytes=down.offered_bytes,
            down_unique=len(self.relay.unique_down),
            down_delivered=down.delivered_datagrams - down.duplicated_datagrams,
            up_overhead_bytes=up.offered_datagrams * profile.uplink.overhead_bytes,
            down_overhead_bytes=down.offered_datagrams * profile.downlink.overhead_bytes,
        )

    # observations --------------------------------------------------------------------

    async def _observe(
        self,
        path: str,
        kind: str,
        handle: Callable[[bytes], Awaitable[None]],
        poll: Callable[[], Awaitable[bool]],
    ) -> None:
        """One registration: the first response, then notifications, with a poll every
        ``refresh`` seconds. ``poll`` returns True when it found news the observation had
        not brought; if no notification follows within ``grace`` the observation is
        presumed dead and this returns (the caller registers again). Raises on failure."""
        client = self.client
        request = client.context.request(client.message(code=Code.GET, uri=client.base + path, observe=0))
        self.recorder.operation(f"observe-{kind}")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pump: asyncio.Task[None] | None = None
        getter: asyncio.Task[Any] | None = None
        try:
            first = await asyncio.wait_for(request.response, self.timing.request_timeout)
            if not first.code.is_successful():
                raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
            if kind == "inbox":
                self.recorder.observation_established(self.user, self.now())
            log.debug("%.3f %s observing %s", self.now(), self.user, path)
            await handle(bytes(first.payload))

            async def pump_notifications() -> None:
                try:
                    async for notification in request.observation:
                        queue.put_nowait(notification)
                    queue.put_nowait(None)
                except Exception as exc:  # handed to the loop below
                    queue.put_nowait(exc)

            pump = asyncio.create_task(pump_notifications())
            next_poll = self.now() + self.timing.refresh * self.rng.uniform(0.9, 1.1)
            expect_by: float | None = None  # a notification is overdue after this
            while True:
                wake = next_poll if expect_by is None else min(next_poll, expect_by)
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=max(0.0, wake - self.now()))
                if done:
                    item = getter.result()
                    getter = None
                    if item is None:  # the server ended it (e.g. not observable)
                        self.recorder.error(f"observe-{kind}: ended by the server")
                        return
                    if isinstance(item, BaseException):
                        raise item
                    if not item.code.is_successful():
                        raise RequestFailed(item.code, item.payload.decode("utf-8", "replace"))
                    log.debug("%.3f %s notified on %s", self.now(), self.user, path)
                    expect_by = None
                    await handle(bytes(item.payload))
                    continue
                if expect_by is not None and self.now() >= expect_by:
                    # RFC 7641 3.3.1: the client may register again when it doubts
                    # the observation is still alive. Only on evidence: a cancelled
                    # OSCORE observation lives on in aiocoap 0.4.17 (module docstring).
                    self.recorder.error(f"observe-{kind}: missed a notification, registering again")
                    log.debug("%.3f %s observation of %s presumed dead", self.now(), self.user, path)
                    return
                if self.now() >= next_poll:
                    if await poll() and expect_by is None:
                        expect_by = self.now() + self.timing.grace
                    next_poll = self.now() + self.timing.refresh * self.rng.uniform(0.9, 1.1)
        finally:
            for task in (pump, getter):
                if task is not None:
                    task.cancel()
            observation = request.observation
            if not observation.cancelled:
                observation.cancel()

    async def _keep_observing(
        self,
        path: str,
        kind: str,
        handle: Callable[[bytes], Awaitable[None]],
        poll: Callable[[], Awaitable[bool]],
    ) -> None:
        attempt = 0
        while True:
            try:
                await self._observe(path, kind, handle, poll)
                attempt = 0
            except RETRYABLE as exc:
                self._transient(f"observe-{kind}", exc)
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))

    # inbox ---------------------------------------------------------------------------

    async def _inbox_loop(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._keep_observing(f"/i/{self.user}", "inbox", self._on_inbox, self._poll_inbox)

    async def _poll_inbox(self) -> bool:
        """Read the queue with the cursor; True if it held messages the observation had not brought."""
        self.recorder.operation("poll-inbox")
        before = self.handled
        batch = await self.client.fetch_inbox(self.handled)
        await self._take(batch.messages, batch.cursor, batch.more)
        return self.handled > before

    async def _on_inbox(self, payload: bytes) -> None:
        messages, cursor, more = codec.decode_batch(payload, self.user)
        await self._take(messages, cursor, more)

    def _deliver(self, messages: Sequence[QueuedMessage]) -> None:
        for queued in sorted(messages, key=lambda m: m.seq):
            if queued.seq <= self.handled:
                continue  # already handed over (the queue head repeats until acknowledged)
            self.handled = queued.seq
            message = queued.message
            log.debug("%.3f %s got #%d from %s", self.now(), self.user, queued.seq, message.sender)
            self.recorder.im_received(self.user, message.sender, bytes(message.msg_id), self.now())

    async def _take(self, messages: Sequence[QueuedMessage], cursor: int, more: bool) -> None:
        """Hand new messages to the application, fetch the rest, acknowledge."""
        self._deliver(messages)
        after = max(self.handled, cursor)
        while more:
            self.recorder.operation("fetch")
            batch = await self.client.fetch_inbox(after)
            self._deliver(batch.messages)
            if batch.cursor <= after and batch.more:
                break  # no progress: try again at the next notification or wake
            after = max(after, batch.cursor)
            more = batch.more
        if self.handled > self.acked:
            upto = self.handled
            self.recorder.operation("ack")
            await self.client.acknowledge(upto)
            self.acked = max(self.acked, upto)

    async def _sleepy_loop(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.0, min(self.timing.wake_interval, self.timing.start_spread + 1.0)))
        while True:
            woke = self.now()
            budget = woke + self.timing.wake_interval / 2
            if self.spec.publishes:
                await self._publish(Status.OPEN, self.timing.sleepy_lease, until=budget)
            for attempt in range(1, 4):
                try:
                    self.recorder.operation("fetch")
                    batch = await self.client.fetch_inbox(self.handled)
                    await self._take(batch.messages, batch.cursor, batch.more)
                    break
                except RETRYABLE as exc:
                    self._transient("sleepy-fetch", exc)
                    if self.now() >= budget:
                        break
                    await asyncio.sleep(self._backoff(attempt))
            await self._sleep_until(woke + self.timing.wake_interval)

    # presence ------------------------------------------------------------------------

    async def _publish(self, status: Status, lease: int, until: float) -> bool:
        self._publishes += 1
        note = f"{self.spec.name}/{self._publishes}"
        self.recorder.publish_attempt(self.user, note, self.now())
        attempt = 0
        while True:
            attempt += 1
            self.recorder.operation("publish")
            try:
                await self.client.publish(PresenceDocument(status, note=note, lease=lease))
            except RETRYABLE as exc:
                self._transient("publish", exc)
                if self.now() >= until:
                    return False
                await asyncio.sleep(self._backoff(attempt))
                continue
            self.recorder.publish_accepted(self.user, note, self.now())
            return True

    async def _presence_loop(self, delay: float) -> None:
        await asyncio.sleep(delay)
        status = Status.OPEN
        while True:
            churning = self.spec.role is Role.CHURN and not self.traffic_over
            if churning and self._publishes:
                status = Status.CLOSED if status is Status.OPEN else Status.OPEN
            if churning:
                pause = min(self.rng.expovariate(1.0 / self.fleet.config.churn_interval), self.timing.keepalive)
            else:
                pause = self.timing.keepalive * self.rng.uniform(0.8, 1.0)
            started = self.now()
            await self._publish(status, self.timing.lease, until=started + pause)
            await self._sleep_until(started + pause)

    async def _watch_loop(self, presentity: UserId, delay: float) -> None:
        await asyncio.sleep(delay)
        latest = -1  # newest version seen

        def saw(doc: PresenceDocument) -> bool:
            nonlocal latest
            self.recorder.presence(self.user, presentity, doc.note, doc.version, doc.out_of_contact, self.now())
            newer = doc.version > latest
            latest = max(latest, doc.version)
            return newer

        async def notified(payload: bytes) -> None:
            saw(codec.decode_presence_view(payload))

        async def poll() -> bool:
            """GET with the ETag of the newest version seen: 2.03 when nothing changed."""
            self.recorder.operation("poll-presence")
            options: dict[str, Any] = {"etags": [_etag(latest)]} if latest >= 0 else {}
            response = await self.client.request(Code.GET, f"/p/{presentity}", **options)
            if response.code == Code.VALID:
                return False
            if not response.code.is_successful():
                raise RequestFailed(response.code, response.payload.decode("utf-8", "replace"))
            return saw(codec.decode_presence_view(response.payload))

        await self._keep_observing(f"/p/{presentity}", "presence", notified, poll)

    # instant messages ----------------------------------------------------------------

    def _next_recipient(self) -> tuple[UserId, bool]:
        spec = self.spec
        every = self.fleet.config.sleepy_every
        if spec.sleepy_targets and (spec.partner is None or (every > 0 and self._ims % every == every - 1)):
            name = spec.sleepy_targets[(self._ims // max(1, every)) % len(spec.sleepy_targets)]
            return self.fleet.user_of(name), True
        assert spec.partner is not None
        return self.fleet.user_of(spec.partner), False

    async def _chat_loop(self, delay: float) -> None:
        try:
            if self.spec.im_times is not None:
                for at in self.spec.im_times:
                    await self._sleep_until(at)
                    await self._send_one()
                return
            await asyncio.sleep(delay)
            while True:
                await asyncio.sleep(self.rng.expovariate(1.0 / self.fleet.config.im_interval))
                if self.traffic_over:
                    return
                await self._send_one()
        finally:
            self.generating = False

    async def _send_one(self) -> None:
        recipient, to_sleepy = self._next_recipient()
        self._ims += 1
        msg_id = MessageId(self.rng.randbytes(8))
        text = f"#{self._ims} " + "".join(self.rng.choices("abcdefghij klmnopqrstuvwxyz", k=self.rng.randint(8, 80)))
        attempt = 0
        while True:
            attempt += 1
            self.recorder.im_attempt(self.user, recipient, msg_id, self.now(), to_sleepy=to_sleepy)
            self.recorder.operation("im")
            try:
                seq = await self.client.send(recipient, text, msg_id=msg_id)
            except RequestFailed as exc:
                if exc.code.class_ != 5:
                    self.recorder.im_gave_up(self.user, msg_id, reason=str(exc.code))
                    return
                self._transient("im", exc)
            except TRANSIENT as exc:
                self._transient("im", exc)
            else:
                self.recorder.im_accepted(self.user, msg_id, seq, self.now())
                log.debug("%.3f %s sent #%d to %s", self.now(), self.user, seq, recipient)
                return
            if self.now() >= self.fleet.give_up_at:
                self.recorder.im_gave_up(self.user, msg_id)
                return
            await asyncio.sleep(self._backoff(attempt))


# -- the fleet -------------------------------------------------------------------------


def _late_pipe_error(exc: BaseException) -> bool:
    """aiocoap 0.4.17's ``Pipe._add_event`` reports an exception that arrives after the
    request's caller stopped listening with ``log.error(..., exception=...)``, which the
    logging module refuses: a ``TypeError`` in a loop callback each time an OSCORE
    request ends after it was abandoned (a cancelled observation, a timeout, a client
    shutting down). Nothing is lost (nobody was listening): count them instead."""
    return isinstance(exc, TypeError) and raised_in(exc, "aiocoap/pipe.py")


class Progress(Protocol):
    def update(self, elapsed: float, text: str, *, done: bool = False) -> None: ...

    def close(self) -> None: ...


class LineProgress:
    """Periodic progress lines on stderr (stdout is kept for the JSON summary)."""

    def __init__(self, total: float, every: float = 2.0) -> None:
        self.total = total
        self.every = every
        self._last = -math.inf

    def update(self, elapsed: float, text: str, *, done: bool = False) -> None:
        if done or elapsed - self._last >= self.every:
            self._last = elapsed
            width = 24
            filled = width if done or self.total <= 0 else min(width, int(width * elapsed / self.total))
            bar = "#" * filled + "." * (width - filled)
            print(f"[{bar}] {elapsed:6.1f}s  {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class TqdmProgress:
    def __init__(self, tqdm_class: Any, total: float) -> None:
        self._bar = tqdm_class(total=round(total, 1), unit="s", file=sys.stderr, leave=True)
        self._shown = 0.0

    def update(self, elapsed: float, text: str, *, done: bool = False) -> None:
        if done:  # the drain ended early: the bar ends here
            self._bar.total = max(round(elapsed, 1), self._shown)
        step = round(max(0.0, min(elapsed, self._bar.total) - self._shown), 1)
        if step > 0:
            self._bar.update(step)
            self._shown += step
        self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._bar.close()


def make_progress(total: float) -> Progress:
    """A tqdm bar when tqdm is installed, else periodic lines."""
    try:
        tqdm_module = importlib.import_module("tqdm")
    except ImportError:
        return LineProgress(total, every=max(1.0, total / 20))
    return TqdmProgress(tqdm_module.tqdm, total)


class Fleet:
    """Devices per spec against one gateway; see the module docstring."""

    def __init__(
        self,
        config: FleetConfig,
        specs: Sequence[DeviceSpec],
        *,
        gateway: Address,
        keystore: KeyStore,
        workdir: Path,
        register: Callable[[UserId], Awaitable[None]] | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        self.config = config
        self.specs = list(specs)
        self.gateway = gateway
        self.keystore = keystore
        self.workdir = workdir
        self.register = register
        self.timing = config.timing()
        self.tuning = config.device_tuning()
        self.recorder = Recorder()
        self.devices: list[SimDevice] = []
        self.by_name: dict[str, SimDevice] = {}
        self.t0 = 0.0
        self.traffic_end = config.duration
        self.give_up_at = config.duration + self.timing.drain
        self._vanishing: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._containment: ContainedLoopErrors | None = None

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    def user_of(self, name: str) -> UserId:
        return parse_user_id(f"{self.config.name_prefix}{name}@{self.config.domain}")

    async def setup(self) -> None:
        """Relays, identities, OSCORE contexts and clients; nothing is sent yet."""
        self._containment = ContainedLoopErrors(
            asyncio.get_running_loop(),
            _late_pipe_error,
            lambda: self.recorder.error("aiocoap late exception (library bug, contained)"),
        )
        profile = self.config.profile
        tuning = transport_tuning(self.tuning.ack_timeout, self.tuning.max_retransmit, self.tuning.ack_random_factor)
        for index, spec in enumerate(self.specs):
            uplink = replace(profile.uplink, outages=(*profile.uplink.outages, *spec.outages))
            downlink = replace(profile.downlink, outages=(*profile.downlink.outages, *spec.outages))
            relay = CountingRelay(
                self.gateway, uplink, downlink, seed=derive_seed(self.config.seed, "link", index), nat=self.config.nat
            )
            await relay.start()
            user = self.user_of(spec.name)
            uri = f"coap://127.0.0.1:{relay.address[1]}"
            try:
                if self.register is not None:
                    await self.register(user)
                credentials = self.keystore.provision(user, self.workdir / "devices", uri)
                client = await DeviceClient.create(
                    uri, user, timeout=self.timing.request_timeout, credentials=credentials.credentials_file,
                    tuning=tuning,
                )
            except BaseException:
                await relay.close()
                raise
            device = SimDevice(self, spec, index, user, relay, client)
            self.devices.append(device)
            self.by_name[spec.name] = device

    async def run(self, progress: Progress | None = None) -> dict[str, Any]:
        """Traffic, then drain; returns the JSON result (see :func:`device_sim.report.summarise`)."""
        if self._started:
            raise RuntimeError("a fleet runs once")
        self._started = True
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        for device in self.devices:
            device.relay.align_start(self.t0)
        for device in self.devices:
            device.start()
            if device.spec.vanish_at is not None:
                self._vanishing.append(asyncio.create_task(self._vanish_at(device, device.spec.vanish_at)))
        try:
            while self.now() < self.config.duration and any(d.generating for d in self.devices):
                self._progress(progress, "traffic")
                await asyncio.sleep(0.05)
            self.traffic_end = min(self.now(), self.config.duration)
            drain_until = self.traffic_end + self.timing.drain
            self.give_up_at = drain_until
            while self.now() < drain_until and not self.settled():
                self._progress(progress, "drain")
                await asyncio.sleep(0.05)
            self._progress(progress, "done", done=True)
        finally:
            if progress is not None:
                progress.close()
        elapsed = self.now()
        await self.stop_devices()
        return summarise(
            self.recorder,
            [d.link_report() for d in self.devices],
            config=self.config.describe(len(self.devices)),
            elapsed=elapsed,
            traffic_end=self.traffic_end,
        )

    def _progress(self, progress: Progress | None, phase: str, done: bool = False) -> None:
        if progress is None:
            return
        r = self.recorder
        accepted = sum(1 for s in r.sent.values() if s.accepted_at is not None)
        text = (
            f"{phase}: IMs {len(r.sent)} sent, {accepted} accepted, {len(r.received)} delivered; "
            f"presence {r.presence_seen} seen; out of contact {len(r.detections)} seen"
        )
        progress.update(self.now(), text, done=done)

    def settled(self) -> bool:
        """Nothing left to wait for: no IM in flight or undelivered, every vanished
        device seen out of contact by its live watchers, no vanishing pending."""
        r = self.recorder
        live = [d.user for d in self.devices if not d.gone]
        return (
            all(task.done() for task in self._vanishing)
            and r.in_flight() == 0
            and not r.undelivered()
            and r.pending_detections(live) == 0
        )

    async def _vanish_at(self, device: SimDevice, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))
        await self.vanish(device)

    async def vanish(self, device: SimDevice) -> None:
        """The device disappears without goodbye: its radio goes silent at once."""
        lease = self.timing.sleepy_lease if device.spec.role is Role.SLEEPY else self.timing.lease
        self.recorder.vanish(device.user, self.now(), lease)
        device.relay.go_dark()
        device.gone = True
        device.generating = False
        await device.stop()

    def rebind(self, name: str) -> None:
        """NAT rebinding for one device: the gateway sees it from a new port from now on."""
        relay = self.by_name[name].relay
        for address in relay.devices:
            relay.rebind(address)

    async def stop_devices(self) -> None:
        for task in self._vanishing:
            task.cancel()
        await asyncio.gather(*self._vanishing, return_exceptions=True)
        await asyncio.gather(*(_bounded(d.stop(), "device stop") for d in self.devices), return_exceptions=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.stop_devices()
        await asyncio.gather(*(_bounded(d.relay.close(), "relay close") for d in self.devices), return_exceptions=True)
        if self._containment is not None:
            self._containment.remove()


async def _bounded(work: Awaitable[object], what: str, seconds: float = 10.0) -> None:
    """Shutdown steps after the measurement: the result is already taken, so a step
    that hangs (aiocoap's context shutdown has no timeout of its own) is abandoned
    with a warning instead of holding the run forever."""
    try:
        await asyncio.wait_for(work, seconds)
    except TimeoutError:
        print(f"warning: {what} did not finish in {seconds:.0f} s; abandoned", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def local_gateway(
    workdir: Path, *, domain: str = "example.org", sweep_interval: float = 0.5
) -> AsyncIterator[Gateway]:
    """An in-process gateway on 127.0.0.1 (random port), SQLite store and key store in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = await Gateway.start(
        bind=("127.0.0.1", 0),
        store=f"sqlite:{workdir / 'gateway.db'}",
        domains=[domain],
        keys=KeyStore(workdir / "keys"),
        sweep_interval=sweep_interval,
    )
    try:
        yield gateway
    finally:
        await _bounded(gateway.close(), "gateway close", 20.0)


@contextlib.asynccontextmanager
async def fleet_on_local_gateway(
    config: FleetConfig, specs: Sequence[DeviceSpec], workdir: Path, *, sweep_interval: float = 0.5
) -> AsyncIterator[tuple[Fleet, Gateway]]:
    """A set-up fleet with its own in-process gateway; both closed on exit."""
    async with local_gateway(workdir / "gateway", domain=config.domain, sweep_interval=sweep_interval) as gateway:
        assert gateway.credentials is not None

        async def register(user: UserId) -> None:
            await gateway.service.register(UserRecord(user))

        fleet = Fleet(
            config, specs, gateway=("127.0.0.1", gateway.port), keystore=gateway.credentials.keystore,
            workdir=workdir, register=register,
        )
        try:
            await fleet.setup()
            yield fleet, gateway
        finally:
            await fleet.close()


async def run_fleet(
    config: FleetConfig,
    specs: Sequence[DeviceSpec],
    *,
    workdir: Path,
    gateway: Address | None = None,
    keys: Path | None = None,
    store: str | None = None,
    sweep_interval: float = 0.5,
    progress: bool = True,
) -> tuple[dict[str, Any], Recorder]:
    """Run ``specs`` against an in-process gateway, or an external one at ``gateway``
    (then ``keys`` is its key store directory, and ``store``, if given, its store URL
    to register the users in; otherwise they must be registered already)."""
    bar = make_progress(config.duration + config.timing().drain) if progress else None
    if gateway is None:
        async with fleet_on_local_gateway(config, specs, workdir, sweep_interval=sweep_interval) as (fleet, _):
            result = await fleet.run(bar)
        return result, fleet.recorder
    if keys is None:
        raise ValueError("an external gateway needs its key store directory (--keys)")
    register: Callable[[UserId], Awaitable[None]] | None = None
    opened = None
    if store is not None:
        from gateway.store import open_store

        opened = await open_store(store)
        the_store = opened

        async def register(user: UserId) -> None:
            await the_store.add_user(UserRecord(user))

    keystore = KeyStore(keys)
    fleet = Fleet(config, specs, gateway=gateway, keystore=keystore, workdir=workdir, register=register)
    try:
        await fleet.setup()
        result = await fleet.run(bar)
    finally:
        await fleet.close()
        # The devices' side of the contexts lived in workdir: leave the operator's
        # gateway as it was (contexts revoked; users removed if we registered them).
        for device in fleet.devices:
            keystore.revoke(device.user)
            if opened is not None:
                await opened.remove_user(device.user)
        if opened is not None:
            await opened.close()
    return result, fleet.recorder


# -- command line ----------------------------------------------------------------------


def _parse_gateway(uri: str) -> Address:
    text = uri.removeprefix("coap://").rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = text.rpartition(":")
    return (host, int(port or 5683))


def _parse_window(text: str) -> tuple[float, float]:
    start, _, end = text.partition(":")
    return float(start), float(end)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=10, help="number of simulated devices (>= 2), default 10")
    parser.add_argument("--profile", default="gprs", choices=profile_names(), help="link profile, default gprs")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of traffic, default 30")
    parser.add_argument("--seed", type=int, default=1, help="seed of links, plan and traffic, default 1")
    parser.add_argument("--out", default="var/fleet", help="directory for the JSON result and PNG plot")
    parser.add_argument(
        "--gateway", help="use this running gateway (coap://127.0.0.1:PORT) instead of an in-process one"
    )
    parser.add_argument("--keys", help="with --gateway: its OSCORE key store directory (devices are provisioned there)")
    parser.add_argument("--store", help="with --gateway: its store URL, to register the simulated users")
    parser.add_argument("--lease", type=int, help="presence lease in seconds (default: duration / 3, 2..300)")
    parser.add_argument("--wake-interval", type=float, help="sleepy devices wake this often (default: duration / 3)")
    parser.add_argument("--im-interval", type=float, default=4.0, help="mean seconds between IMs of a chat device")
    parser.add_argument("--refresh", type=float, help="poll observed resources this often (default: the lease)")
    parser.add_argument("--drain", type=float, help="longest wait after traffic for deliveries (default derived)")
    parser.add_argument("--ack-timeout", type=float, help="override the profile's ACK_TIMEOUT")
    parser.add_argument("--max-retransmit", type=int, help="override the profile's MAX_RETRANSMIT")
    parser.add_argument("--nat-rebind", type=float, help="NAT rebinding of every device this often (seconds)")
    parser.add_argument("--outage", type=_parse_window, metavar="START:END",
                        help="link outage (seconds since start) for the second device of every chat pair")
    parser.add_argument("--sweep-interval", type=float, default=0.5, help="in-process gateway's lease sweep period")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run_cli(args: argparse.Namespace) -> int:
    """``python -m device_sim run``: the last stdout line is the JSON summary."""
    if args.devices < 2:
        print("error: --devices must be at least 2", file=sys.stderr)
        return 2
    profile = get_profile(args.profile)
    tuning = None
    if args.ack_timeout is not None or args.max_retransmit is not None:
        base = Tuning.from_profile(profile)
        tuning = Tuning(
            args.ack_timeout if args.ack_timeout is not None else base.ack_timeout,
            args.max_retransmit if args.max_retransmit is not None else base.max_retransmit,
            base.ack_random_factor,
        )
    gateway = _parse_gateway(args.gateway) if args.gateway else None
    config = FleetConfig(
        profile=profile,
        duration=args.duration,
        seed=args.seed,
        tuning=tuning,
        lease=args.lease,
        wake_interval=args.wake_interval,
        im_interval=args.im_interval,
        refresh=args.refresh,
        drain=args.drain,
        nat=NatParams(rebind_interval_s=args.nat_rebind) if args.nat_rebind else None,
        name_prefix="" if gateway is None else f"r{int(time.time()) % 100000}",
    )
    specs = plan_fleet(args.devices, duration=args.duration, outage=args.outage)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fleet-{profile.name}-n{args.devices}-s{args.seed}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        result, recorder = asyncio.run(
            run_fleet(
                config,
                specs,
                workdir=Path(tmp),
                gateway=gateway,
                keys=Path(args.keys) if args.keys else None,
                store=args.store,
                sweep_interval=args.sweep_interval,
                progress=not args.quiet,
            )
        )
    result["wall_clock_s"] = round(time.monotonic() - started, 3)
    json_path = out / f"{stem}.json"
    png_path = out / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": None if args.no_plot else str(png_path)}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(result, recorder, png_path)
    print(json.dumps(headline(result)), flush=True)
    return 0
