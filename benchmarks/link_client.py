"""Device side of ``python -m benchmarks link``: two clients of one system, run inside the
device namespace of a :class:`device_sim.tun.PacketLink` (``ip netns exec``).

``python -m benchmarks.link_client SYSTEM --server ADDR --port N [options]``, started
by :mod:`benchmarks.link`, never by hand. Alice (the sender) and Bob (the receiver) are
two clients in this one process, so one monotonic clock times every item from Alice's
send to Bob's application.

Conversation with the orchestrator, one JSON object per line:

* stdout ``{"phase": NAME}`` then wait for one line (``go``) on stdin: the orchestrator
  lets the link go quiet and reads its counters, so every packet is booked to the
  phase that caused it. Phases: ``setup``, ``im``, ``presence``, ``teardown``.
* stdout ``{"progress": KIND, "done": K, "of": N}`` now and then;
* stdout ``{"result": {...}}`` last (anything on stderr is a log).

The policy, the same for every system: Alice has at most ``--window`` items out that
Bob has not yet received; an item leaves the window when Bob's application gets it,
when Alice's own protocol reports it failed, or ``--item-timeout`` seconds after it was
sent (counted lost then; a later arrival still counts as delivered, and as late). After
``--give-up-after`` items in a row were lost the phase stops (the system is taken to be broken
rather than slow); the items not sent count as not delivered. Until then every sender keeps
trying, as a device must: ours resends the same IM (same id, stored once) or the same publish
after CoAP gave up on its retransmissions; paho queues and resends QoS 1 messages across
reconnects (persistent sessions); TCP retransmits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cbor2

from .peers import content

ALICE = content.ALICE  # the sender: sends the IMs, publishes the presence changes
BOB = content.BOB  # the receiver: reads his inbox, watches Alice
SYSTEMS = ("ours", "mqtt", "mqtt-tls", "xmpp-tls")
SETUP_NOTE = "setup"
MQTT_TOPIC_IM = f"i/{BOB}"  # Bob's inbox
MQTT_TOPIC_PRESENCE = f"p/{ALICE}"  # Alice's presence, retained
PROGRESS_EVERY = 10

_T = TypeVar("_T")


def labelled(index: int, base: str) -> str:
    """``base`` with its start replaced by ``"<index>:"``: same length for every item (20 characters here).

    >>> labelled(7, content.IM20)
    '7:e you at 10:30 ok?'
    """
    prefix = f"{index}:"
    return prefix + base[len(prefix):]


def index_of(text: str | None) -> int | None:
    """The item number :func:`labelled` put in ``text``; None for anything else (the setup note)."""
    if not text:
        return None
    head, colon, _ = text.partition(":")
    return int(head) if colon and head.isdigit() else None


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


@dataclass
class Tally:
    """What happened to the items of one phase (IMs or presence changes)."""

    kind: str
    count: int
    sent_at: dict[int, float] = field(default_factory=dict)
    received_at: dict[int, float] = field(default_factory=dict)
    gave_up_at: dict[int, float] = field(default_factory=dict)
    send_errors: dict[int, str] = field(default_factory=dict)
    duplicates: int = 0
    unexpected: int = 0
    stopped_early: str | None = None
    started: float | None = None
    ended: float | None = None
    _arrivals: dict[int, asyncio.Future[None]] = field(default_factory=dict)

    def expect(self, index: int) -> asyncio.Future[None]:
        future = self._arrivals.get(index)
        if future is None:
            future = self._arrivals[index] = asyncio.get_running_loop().create_future()
            if index in self.received_at:
                future.set_result(None)
        return future

    def receipt(self, index: int | None, at: float) -> None:
        """Bob's application got item ``index`` at monotonic time ``at`` (called in the event loop)."""
        if index is None:
            return
        if index not in self.sent_at:  # never sent (yet): a protocol echo or a stray; not ours to count
            self.unexpected += 1
            return
        if index in self.received_at:
            self.duplicates += 1
            return
        self.received_at[index] = at
        future = self._arrivals.get(index)
        if future is not None and not future.done():
            future.set_result(None)

    def as_dict(self) -> dict[str, Any]:
        latencies = [round(self.received_at[i] - self.sent_at[i], 4) for i in sorted(self.received_at)]
        late = sum(1 for i, at in self.received_at.items() if i in self.gave_up_at and at > self.gave_up_at[i])
        return {
            "kind": self.kind,
            "count": self.count,
            "sent": len(self.sent_at),
            "received": len(self.received_at),
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "late": late,
            "gave_up": len(self.gave_up_at),
            "send_errors": len(self.send_errors),
            "send_error_examples": sorted(set(self.send_errors.values()))[:5],
            "stopped_early": self.stopped_early,
            "total_s": round(self.ended - self.started, 4) if self.started is not None and self.ended else None,
            "latencies_s": latencies,
        }


@dataclass(frozen=True)
class Policy:
    """How items are sent, the same for every system (module docstring)."""

    window: int = 1
    item_timeout: float = 60.0
    give_up_after: int = 5


@dataclass(frozen=True)
class Liveness:
    """How each system keeps its session alive while idle, every ``refresh`` seconds of silence:
    ours polls what it observes (and registers again on evidence that an observation died);
    MQTT sends PINGREQ (keepalive); XMPP a whitespace keepalive."""

    refresh: float = 30.0
    grace: float = 5.0  # ours: how long after a poll found news a notification must follow


async def drive(tally: Tally, policy: Policy, send_item: Callable[[int], Awaitable[Any]]) -> None:
    """Send items 0..count-1 under ``policy``; every wait is bounded by its item timeout."""
    loop = asyncio.get_running_loop()
    window, item_timeout, give_up_after = policy.window, policy.item_timeout, policy.give_up_after
    sending: set[asyncio.Task[Any]] = set()

    def note_failure(index: int, task: asyncio.Task[Any]) -> None:
        sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            tally.send_errors[index] = f"{type(exc).__name__}: {exc}"[:200]

    async def one(index: int) -> None:
        arrived = tally.expect(index)
        tally.sent_at[index] = loop.time()
        task = asyncio.ensure_future(send_item(index))
        sending.add(task)
        task.add_done_callback(functools.partial(note_failure, index))
        deadline = tally.sent_at[index] + item_timeout
        waiting: set[asyncio.Future[Any]] = {arrived, task}
        while not arrived.done() and loop.time() < deadline:
            await asyncio.wait(waiting, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                if task.cancelled() or task.exception() is not None:
                    break  # Alice's protocol gave up on it: it will not arrive
                waiting = {arrived}
        if not arrived.done():
            tally.gave_up_at[index] = loop.time()

    def lost_in_a_row() -> int:
        run = 0
        for index in sorted(tally.sent_at, reverse=True):
            if index in tally.received_at:
                break
            if index in tally.gave_up_at:
                run += 1
        return run

    out: set[asyncio.Task[None]] = set()
    tally.started = loop.time()
    for index in range(tally.count):
        while len(out) >= window:
            _, out = await asyncio.wait(out, return_when=asyncio.FIRST_COMPLETED)
        if lost_in_a_row() >= give_up_after:
            tally.stopped_early = f"{give_up_after} items in a row lost: stopped after {index} of {tally.count}"
            break
        out.add(asyncio.create_task(one(index)))
        if index and index % PROGRESS_EVERY == 0:
            emit({"progress": tally.kind, "done": index, "of": tally.count})
    if out:
        await asyncio.wait(out)
    tally.ended = loop.time()
    emit({"progress": tally.kind, "done": tally.count, "of": tally.count})
    # Alice's own acknowledgements still under way (e.g. a 2.01 slower than Bob's notification)
    # belong to this phase; bounded, then abandoned.
    if sending:
        await asyncio.wait(set(sending), timeout=item_timeout)
    for task in list(sending):
        task.cancel()


class Orchestrator:
    """The stdin side of the phase handshake."""

    def __init__(self, reader: asyncio.StreamReader, timeout: float) -> None:
        self.reader = reader
        self.timeout = timeout

    @classmethod
    async def attach(cls, timeout: float) -> Orchestrator:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return cls(reader, timeout)

    async def phase(self, name: str) -> None:
        emit({"phase": name})
        line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        if line.strip() != b"go":
            raise RuntimeError(f"orchestrator said {line!r} instead of go before phase {name}")


# ---------------------------------------------------------------------------
# ours: the gateway over CoAP + OSCORE, devices = device_sim.client.DeviceClient


@dataclass
class ObservationStats:
    registrations: int = 0
    re_registrations: int = 0
    polls: int = 0
    polls_with_news: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"registrations": self.registrations, "re_registrations": self.re_registrations,
                "polls": self.polls, "polls_with_news": self.polls_with_news, "errors": self.errors[:10],
                "error_count": len(self.errors)}


async def _pump(observation: Any, queue: asyncio.Queue[tuple[Any, float] | BaseException | None]) -> None:
    """aiocoap's notifications into ``queue``, each timed on arrival; then None, or the failure."""
    loop = asyncio.get_running_loop()
    try:
        async for notification in observation:
            queue.put_nowait((notification, loop.time()))
        queue.put_nowait(None)
    except Exception as exc:  # handed to keep_observing
        queue.put_nowait(exc)


async def keep_observing(
    client: Any,
    path: str,
    handle: Callable[[Any, float], Awaitable[None]],
    poll: Callable[[], Awaitable[bool]],
    liveness: Liveness,
    stats: ObservationStats,
) -> None:
    """Observe ``path`` for good, as a device on a lossy link must (device_sim/fleet.py does the same).

    A gateway drops an observation whose notification it could not deliver (RFC 7641 4.5), and a
    device cannot tell. So when the observation has been silent for ``liveness.refresh`` seconds
    the device polls; a poll delivers what it finds, and when it found news that no notification
    follows within ``liveness.grace`` the observation is presumed dead and registered again. Only
    on such evidence: aiocoap 0.4.17 cannot cancel an OSCORE observation (fleet.py's docstring).
    """
    from aiocoap import Code

    from device_sim.client import RequestFailed
    from device_sim.fleet import RETRYABLE

    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        request = client.requester.request(client.message(code=Code.GET, uri=client.base + path, observe=0))
        notifications: asyncio.Queue[tuple[Any, float] | BaseException | None] = asyncio.Queue()
        pump: asyncio.Task[None] | None = None
        try:
            first = await asyncio.wait_for(request.response, client.timeout)
            if not first.code.is_successful():
                raise RequestFailed(first.code, first.payload.decode("utf-8", "replace"))
            stats.registrations += 1
            attempt = 0
            await handle(first, loop.time())
            pump = asyncio.create_task(_pump(request.observation, notifications))
            heard = loop.time()
            expect_by: float | None = None  # a notification is overdue after this
            while True:
                wake = heard + liveness.refresh if expect_by is None else expect_by
                try:
                    item = await asyncio.wait_for(notifications.get(), max(0.0, wake - loop.time()))
                except TimeoutError:
                    if expect_by is not None:
                        stats.re_registrations += 1
                        break  # presumed dead: register again
                    stats.polls += 1
                    if await poll():
                        stats.polls_with_news += 1
                        expect_by = loop.time() + liveness.grace
                    heard = loop.time()
                    continue
                if item is None:  # the gateway ended it (e.g. a final non-2.05 notification): register again
                    stats.errors.append(f"{path}: observation ended by the gateway")
                    stats.re_registrations += 1
                    break
                if isinstance(item, BaseException):
                    raise item
                notification, at = item
                if notification.code.is_successful():
                    heard, expect_by = at, None
                    await handle(notification, at)
        except RETRYABLE as exc:
            stats.errors.append(f"{path}: {type(exc).__name__}: {exc}"[:200])
            attempt += 1
            await asyncio.sleep(min(30.0, 2.0**attempt))
        finally:
            if pump is not None:
                pump.cancel()


async def run_ours(args: argparse.Namespace, link: Orchestrator, im: Tally, presence: Tally,
                   info: dict[str, Any]) -> None:
    from aiocoap import Code

    from device_sim.client import DeviceClient, RequestFailed, transport_tuning
    from gateway.core import codec
    from gateway.core.ids import UserId
    from gateway.core.model import PresenceDocument, QueuedMessage, Status

    for name in ("coap", "aiocoap"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tuning = transport_tuning(args.ack_timeout, args.max_retransmit)
    uri = f"coap://{args.server}:{args.port}"
    alice_id, bob_id = UserId(ALICE), UserId(BOB)
    inbox_stats, presence_stats = ObservationStats(), ObservationStats()
    acknowledge_errors: list[str] = []
    info["coap"] = {"ack_timeout": args.ack_timeout, "max_retransmit": args.max_retransmit,
                    "request_timeout_s": args.item_timeout, "security": "OSCORE",
                    "refresh_s": args.liveness.refresh, "grace_s": args.liveness.grace}
    clients: list[DeviceClient] = []
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    try:
        await link.phase("setup")
        alice = await DeviceClient.create(uri, alice_id, timeout=args.item_timeout,
                                          credentials=Path(args.alice_credentials), tuning=tuning)
        clients.append(alice)
        bob = await DeviceClient.create(uri, bob_id, timeout=args.item_timeout,
                                        credentials=Path(args.bob_credentials), tuning=tuning)
        clients.append(bob)
        await asyncio.wait_for(alice.publish(PresenceDocument(Status.OPEN, note=SETUP_NOTE)), args.setup_timeout)
        inbox_open: asyncio.Future[None] = loop.create_future()
        watching: asyncio.Future[None] = loop.create_future()
        acknowledgements: asyncio.Queue[int] = asyncio.Queue()
        handled = 0  # highest inbox seq handed to Bob's application
        presence_etag: bytes | None = None  # of the newest representation of Alice's presence Bob got
        presence_version = -1  # its version: each state reaches Bob's application once, as with the inbox's seq

        def deliver(messages: list[QueuedMessage], at: float) -> None:
            nonlocal handled
            for queued in sorted(messages, key=lambda m: m.seq):
                if queued.seq > handled:  # the queue head repeats until acknowledged
                    handled = queued.seq
                    im.receipt(index_of(queued.message.payload.decode("utf-8", "replace")), at)

        async def take(messages: list[QueuedMessage], cursor: int, more: bool, at: float) -> None:
            if not inbox_open.done():
                inbox_open.set_result(None)
            deliver(messages, at)
            after = max(handled, cursor)
            while more:
                batch = await bob.fetch_inbox(after)
                deliver(batch.messages, loop.time())
                if batch.cursor <= after and batch.more:
                    break  # no progress: again at the next notification or poll
                after, more = max(after, batch.cursor), batch.more
            if handled:
                acknowledgements.put_nowait(handled)

        async def inbox_notified(message: Any, at: float) -> None:
            await take(*codec.decode_batch(bytes(message.payload), bob_id), at)

        async def poll_inbox() -> bool:
            before = handled
            batch = await bob.fetch_inbox(handled)
            await take(batch.messages, batch.cursor, batch.more, loop.time())
            return handled > before

        async def acknowledge() -> None:
            # Apart from reading, so that a slow DELETE never delays the next notification;
            # store-and-forward needs it (the inbox would otherwise keep growing).
            acked = 0
            while True:
                upto = await acknowledgements.get()
                while not acknowledgements.empty():
                    upto = max(upto, acknowledgements.get_nowait())
                if upto <= acked:
                    continue
                try:
                    await bob.acknowledge(upto)
                    acked = upto
                except Exception as exc:
                    acknowledge_errors.append(f"{type(exc).__name__}: {exc}"[:200])

        def saw_presence(payload: bytes, etag: bytes | None, at: float) -> bool:
            """Hand a newer version of Alice's presence to Bob's application; True if it was newer."""
            nonlocal presence_etag, presence_version
            doc = codec.decode_presence_view(payload)
            presence_etag = etag or presence_etag
            if doc.version <= presence_version:  # the current state again (a re-registration's first response)
                return False
            presence_version = doc.version
            if doc.note == SETUP_NOTE and not watching.done():
                watching.set_result(None)
            presence.receipt(index_of(doc.note), at)
            return True

        async def presence_notified(message: Any, at: float) -> None:
            saw_presence(bytes(message.payload), message.opt.etag, at)

        async def poll_presence() -> bool:
            # With the ETag of the newest representation seen: 2.03 Valid (no body) when unchanged.
            options: dict[str, Any] = {"etags": [presence_etag]} if presence_etag else {}
            response = await bob.request(Code.GET, f"/p/{alice_id}", **options)
            if response.code == Code.VALID:
                return False
            if not response.code.is_successful():
                raise RequestFailed(response.code, response.payload.decode("utf-8", "replace"))
            return saw_presence(bytes(response.payload), response.opt.etag, loop.time())

        tasks += [
            asyncio.create_task(keep_observing(bob, f"/i/{bob_id}", inbox_notified, poll_inbox, args.liveness,
                                               inbox_stats)),
            asyncio.create_task(acknowledge()),
            asyncio.create_task(keep_observing(bob, f"/p/{alice_id}", presence_notified, poll_presence,
                                               args.liveness, presence_stats)),
        ]
        await _setup_done([inbox_open, watching], tasks, args.setup_timeout)

        async def send_im(index: int) -> int:
            msg_id = alice.new_message_id()  # the same for every attempt: the gateway stores the IM once
            return await persist(lambda: alice.send(bob_id, labelled(index, content.IM20), msg_id=msg_id),
                                 args.policy.item_timeout)

        async def publish(index: int) -> bytes:
            doc = PresenceDocument(Status.OPEN, note=labelled(index, content.NOTE))
            return await persist(lambda: alice.publish(doc), args.policy.item_timeout)

        await link.phase("im")
        await drive(im, args.policy, send_im)
        await link.phase("presence")
        await drive(presence, args.policy, publish)
        _raise_if_failed(tasks)
        await link.phase("teardown")
    finally:
        info["observations"] = {"inbox": inbox_stats.as_dict(), "presence": presence_stats.as_dict()}
        info["acknowledge_errors"] = acknowledge_errors[:10]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)


async def persist(attempt: Callable[[], Awaitable[_T]], within: float) -> _T:
    """``attempt()`` again after each transient failure (CoAP retransmissions exhausted, a timeout) for
    ``within`` seconds, as a device keeps trying (device_sim/fleet.py): the way TCP and paho keep trying."""
    from device_sim.fleet import TRANSIENT

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await asyncio.wait_for(attempt(), max(0.1, deadline - loop.time()))
        except TRANSIENT:
            if loop.time() >= deadline - 1.0:
                raise
            await asyncio.sleep(0.5)  # never a hot loop, whatever failed at once


async def _setup_done(waits: list[asyncio.Future[None]], tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Wait for ``waits``, but fail at once if a background task (a watcher) died meanwhile."""
    pending: set[asyncio.Future[Any]] = {*waits, *tasks}
    deadline = asyncio.get_running_loop().time() + timeout
    while not all(w.done() for w in waits):
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError(f"setup not done within {timeout:g} s")
        done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        _raise_if_failed([t for t in done if t in tasks])


def _raise_if_failed(tasks: list[asyncio.Task[None]] | list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"a receiving task failed: {task.exception()!r}") from task.exception()


# ---------------------------------------------------------------------------
# MQTT 3.1.1, QoS 1: paho-mqtt clients of benchmarks.peers.mqtt


async def run_mqtt(args: argparse.Namespace, link: Orchestrator, im: Tally, presence: Tally,
                   info: dict[str, Any]) -> None:
    from .peers import mqtt as peer

    peer.TIMEOUT = args.setup_timeout  # its waits for CONNACK/SUBACK: a handshake over GPRS can take seconds
    loop = asyncio.get_running_loop()
    ca = args.ca if args.tls else None
    # Persistent sessions (clean session 0), as a device that must not lose messages uses MQTT: when the
    # broker drops a connection (no packet for 1.5 x keepalive, e.g. in a long loss burst) paho reconnects,
    # the broker kept Bob's subscriptions and queued his QoS 1 messages, and paho resends Alice's unacknowledged
    # PUBLISH. With clean sessions a reconnected Bob would have no subscriptions left.
    alice = peer._Client("alice", (args.server, args.port), 4, ca, clean_session=False)
    bob = peer._Client("bob", (args.server, args.port), 4, ca, clean_session=False)
    disconnects = {"alice": 0, "bob": 0}
    retained_seen: asyncio.Future[None] = loop.create_future()
    pubacks: dict[int, asyncio.Future[None]] = {}

    def on_bob_message(index: int | None, topic: str, at: float) -> None:
        if topic == MQTT_TOPIC_IM:
            im.receipt(index, at)
        elif topic == MQTT_TOPIC_PRESENCE:
            if index is None and not retained_seen.done():
                retained_seen.set_result(None)
            presence.receipt(index, at)

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:  # paho's network thread
        at = loop.time()  # the event loop's clock is time.monotonic
        body = cbor2.loads(message.payload) if message.payload else {}
        text = body.get(5, b"").decode("utf-8", "replace") if message.topic == MQTT_TOPIC_IM else body.get(1)
        loop.call_soon_threadsafe(on_bob_message, index_of(text), message.topic, at)

    def acknowledged(mid: int) -> None:
        # In the event loop, like publish(): the PUBACK cannot be handled before publish() registered its mid.
        future = pubacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def disconnected(who: str) -> None:
        disconnects[who] += 1

    def on_disconnect(who: str, *_paho_arguments: Any) -> None:  # paho's network thread
        loop.call_soon_threadsafe(disconnected, who)

    bob.client.on_message = on_message
    for who, peer_client in (("alice", alice), ("bob", bob)):
        peer_client.client.on_disconnect = functools.partial(on_disconnect, who)
    alice.client.on_publish = lambda _c, _u, mid, _rc, _p: loop.call_soon_threadsafe(acknowledged, mid)

    async def publish(topic: str, payload: bytes, retain: bool) -> None:
        """QoS 1: done when the broker's PUBACK arrived (paho retransmits on its own until then)."""
        message_info = alice.client.publish(topic, payload, qos=1, retain=retain)
        if message_info.rc not in (alice.mqtt.MQTT_ERR_SUCCESS, alice.mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"paho publish returned {message_info.rc}")  # NO_CONN: queued until reconnected
        future = pubacks[message_info.mid] = loop.create_future()
        await future

    def im_payload(index: int) -> bytes:
        # The gateway's IM body ({0: id, 5: text}) plus the sender (1): the broker does not say who published.
        return cbor2.dumps({0: os.urandom(8), 1: ALICE, 5: labelled(index, content.IM20).encode()})

    def presence_payload(note: str) -> bytes:
        return cbor2.dumps({0: 1, 1: note})

    keepalive = max(1, round(args.liveness.refresh))  # PINGREQ after this long without a control packet sent
    info["mqtt"] = {"version": "3.1.1", "qos": 1, "keepalive_s": keepalive, "clean_session": False, "tls": bool(ca)}
    try:
        await link.phase("setup")
        await asyncio.to_thread(alice.connect, keepalive)
        await asyncio.to_thread(bob.connect, keepalive)
        if ca is not None:
            sock = alice.client.socket()
            info["tls"] = f"{sock.version()} {sock.cipher()[0]}"
        await asyncio.wait_for(publish(MQTT_TOPIC_PRESENCE, presence_payload(SETUP_NOTE), True), args.setup_timeout)
        await asyncio.to_thread(bob.subscribe, MQTT_TOPIC_IM)
        await asyncio.to_thread(bob.subscribe, MQTT_TOPIC_PRESENCE)
        await asyncio.wait_for(retained_seen, args.setup_timeout)

        await link.phase("im")
        await drive(im, args.policy, lambda i: publish(MQTT_TOPIC_IM, im_payload(i), False))
        await link.phase("presence")
        await drive(presence, args.policy,
                    lambda i: publish(MQTT_TOPIC_PRESENCE, presence_payload(labelled(i, content.NOTE)), True))
        info["mqtt"]["disconnects_during_run"] = dict(disconnects)  # before teardown's own disconnects
        await link.phase("teardown")
    finally:
        for client in (alice, bob):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(client.close), 5)


# ---------------------------------------------------------------------------
# XMPP over TLS: slixmpp clients of benchmarks.peers.xmpp


async def run_xmpp(args: argparse.Namespace, link: Orchestrator, im: Tally, presence: Tally,
                   info: dict[str, Any]) -> None:
    from .peers import xmpp as peer

    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    client_class = peer._client_class()
    loop = asyncio.get_running_loop()
    clients: dict[str, Any] = {}
    alice_seen: asyncio.Future[None] = loop.create_future()
    disconnects = {"alice": 0, "bob": 0}  # not repaired: no XEP-0198 resumption, and Prosody keeps no offline store

    def disconnected(who: str, _event: Any) -> None:
        disconnects[who] += 1

    def on_message(message: Any) -> None:
        at = loop.time()
        if message["type"] in ("chat", "normal") and message["from"].bare == ALICE:
            im.receipt(index_of(str(message["body"])), at)

    def on_presence(stanza: Any) -> None:
        at = loop.time()
        if stanza["from"].bare != ALICE:
            return
        status = str(stanza["status"])
        if status == SETUP_NOTE and not alice_seen.done():
            alice_seen.set_result(None)
        presence.receipt(index_of(status), at)

    async def send_im(index: int) -> None:
        # No sender-side acknowledgement without XEP-0198 (not enabled): TCP is the only reliability.
        clients["alice"].make_message(mto=BOB, mbody=labelled(index, content.IM20), mtype="chat").send()

    async def send_presence(index: int) -> None:
        clients["alice"].send_presence(pstatus=labelled(index, content.NOTE))

    info["xmpp"] = {"tls": "STARTTLS required", "stream_management": False, "receipts": False,
                    "whitespace_keepalive_s": args.liveness.refresh}
    try:
        await link.phase("setup")
        for leg, jid in (("alice", ALICE), ("bob", BOB)):
            client = client_class(jid, peer.PASSWORDS[leg], args.ca)
            client.whitespace_keepalive_interval = args.liveness.refresh  # one space every refresh s, idle or not
            client.roster.auto_authorize = True  # Alice approves Bob's subscription
            client.roster.auto_subscribe = False
            clients[leg] = client
            client.add_event_handler("disconnected", functools.partial(disconnected, leg))
            client.connect(args.server, args.port)
            await asyncio.wait_for(client.ready, args.setup_timeout)
        alice, bob = clients["alice"], clients["bob"]
        ssl_object = alice.transport.get_extra_info("ssl_object") if alice.transport else None
        if ssl_object is not None:
            info["tls"] = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
        bob.add_event_handler("message", on_message)
        bob.add_event_handler("presence_available", on_presence)
        alice.send_presence(pstatus=SETUP_NOTE)
        bob.send_presence()
        bob.send_presence(pto=ALICE, ptype="subscribe")  # Prosody then sends Alice's presence to Bob
        await asyncio.wait_for(alice_seen, args.setup_timeout)

        await link.phase("im")
        await drive(im, args.policy, send_im)
        await link.phase("presence")
        await drive(presence, args.policy, send_presence)
        info["xmpp"]["disconnects_during_run"] = dict(disconnects)
        await link.phase("teardown")
    finally:
        await peer.disconnect_all(clients.values(), wait=1.0, timeout=3)


# ---------------------------------------------------------------------------


RUNNERS = {"ours": run_ours, "mqtt": run_mqtt, "mqtt-tls": run_mqtt, "xmpp-tls": run_xmpp}


async def run(args: argparse.Namespace) -> int:
    link = await Orchestrator.attach(args.handshake_timeout)
    im, presence = Tally("im", args.count), Tally("presence", args.count)
    info: dict[str, Any] = {}
    error: str | None = None
    started = time.monotonic()
    try:
        await RUNNERS[args.system](args, link, im, presence, info)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        error = f"{type(exc).__name__}: {exc}"[:500]
    emit({"result": {"system": args.system, "error": error, "im": im.as_dict(), "presence": presence.as_dict(),
                     "info": info, "client_wall_s": round(time.monotonic() - started, 3)}})
    return 0 if error is None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.link_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("--server", required=True, help="the server's address (gateway namespace)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--item-timeout", type=float, default=60.0)
    parser.add_argument("--give-up-after", type=int, default=5, help="stop a phase after this many losses in a row")
    parser.add_argument("--refresh", type=float, default=30.0, help="keep-alive period of an idle session (Liveness)")
    parser.add_argument("--grace", type=float, default=5.0, help="ours: a notification is overdue after a poll found "
                        "news this long ago")
    parser.add_argument("--setup-timeout", type=float, default=60.0)
    parser.add_argument("--handshake-timeout", type=float, default=120.0, help="longest wait for the orchestrator")
    parser.add_argument("--alice-credentials", help="ours: Alice's OSCORE credentials file")
    parser.add_argument("--bob-credentials", help="ours: Bob's OSCORE credentials file")
    parser.add_argument("--ack-timeout", type=float, default=2.0, help="ours: CoAP ACK_TIMEOUT of the devices")
    parser.add_argument("--max-retransmit", type=int, default=4, help="ours: CoAP MAX_RETRANSMIT of the devices")
    parser.add_argument("--ca", help="mqtt-tls, xmpp-tls: the server's certificate")
    args = parser.parse_args(argv)
    if args.count < 1 or args.window < 1 or args.give_up_after < 1 or args.item_timeout <= 0:
        parser.error("--count, --window and --give-up-after must be >= 1 and --item-timeout > 0")
    args.tls = args.system == "mqtt-tls"
    args.policy = Policy(args.window, args.item_timeout, args.give_up_after)
    args.liveness = Liveness(args.refresh, args.grace)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
