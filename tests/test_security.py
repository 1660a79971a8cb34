"""Security over real UDP with real OSCORE: identities, every access rule, attacks.

RFC 2779 2.3 (access control), 5.1-5.4 (subscriptions, notifications, instant messages).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiocoap import Code, Message
from aiocoap.numbers.constants import TransportTuning
from aiocoap.oscore import NotAProtectedMessage

from device_sim.client import DeviceClient, RequestFailed
from gateway.app import Gateway
from gateway.core import codec
from gateway.core.access import AccessRules, Field, View
from gateway.core.ids import UserId
from gateway.core.model import Contact, InstantMessage, MessageId, PresenceDocument, Seq, Status, UserRecord
from gateway.core.subscriptions import SubscriptionState
from gateway.keys import KeyStore

from .conftest import ADMIN, ALICE, BOB, CAROL, ManualClock, eventually, keystore_of, provisioned_device, start_gateway
from .rawcoap import RawDevice

MakeDevice = Callable[..., Awaitable[DeviceClient]]
MakeAnonymous = Callable[[], Awaitable[DeviceClient]]
FULL = PresenceDocument(
    Status.OPEN, note="in the lab", contact=Contact(tel="+1 555", email="alice@example.org"), extensions={"x": 1}
)


async def _true(value: bool) -> bool:
    return value


async def code_of(call: Awaitable[object]) -> Code:
    try:
        await call
    except RequestFailed as exc:
        return exc.code
    return Code.CONTENT


class Watch:
    """A subscription (Observe) running in the background, collecting what it sees."""

    def __init__(self, client: DeviceClient, presentity: UserId) -> None:
        self.docs: list[PresenceDocument] = []
        self.ended: RequestFailed | None = None
        self.task = asyncio.create_task(self._run(client, presentity))

    async def _run(self, client: DeviceClient, presentity: UserId) -> None:
        request = client.context.request(Message(code=Code.GET, uri=f"{client.base}/p/{presentity}", observe=0))
        first = await request.response
        if not first.code.is_successful():
            self.ended = RequestFailed(first.code, first.payload.decode())
            return
        self.docs.append(codec.decode_presence_view(first.payload))
        async for note in request.observation:
            if not note.code.is_successful():
                self.ended = RequestFailed(note.code, note.payload.decode())
                return
            self.docs.append(codec.decode_presence_view(note.payload))
        # aiocoap ends the iteration on an error notification by raising; handled below

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# -- identities and anonymous access ---------------------------------------------------------


async def test_anonymous_may_do_nothing_by_default(device: MakeDevice, anonymous: MakeAnonymous) -> None:
    alice, anon = await device(ALICE), await anonymous()
    await alice.publish(FULL)
    assert await code_of(anon.fetch_presence(ALICE)) == Code.UNAUTHORIZED
    publish = codec.encode_presence(PresenceDocument(Status.CLOSED, note="spoof"), for_publish=True)
    assert (await anon.request(Code.PUT, f"/p/{ALICE}", publish)).code == Code.UNAUTHORIZED
    assert (await anon.request(Code.DELETE, f"/p/{ALICE}")).code == Code.UNAUTHORIZED
    assert (await alice.fetch_presence(ALICE)).note == "in the lab"
    body = codec.encode_message(InstantMessage(MessageId(b"1"), ALICE, BOB, b"hi"))
    assert (await anon.request(Code.POST, f"/i/{BOB}", body)).code == Code.UNAUTHORIZED
    assert (await anon.request(Code.GET, f"/i/{ALICE}")).code == Code.UNAUTHORIZED
    assert (await anon.request(Code.GET, f"/o/{ALICE}")).code == Code.UNAUTHORIZED
    assert (await anon.request(Code.GET, f"/r/{ALICE}")).code == Code.UNAUTHORIZED
    assert (await alice.fetch_inbox()).messages == []  # nothing was stored for bob either
    bob = await device(BOB)
    assert (await bob.fetch_inbox()).messages == []


async def test_sender_is_the_authenticated_principal(device: MakeDevice) -> None:
    """5.4.3: B can verify A sent it. The gateway fills `from` from the OSCORE identity
    and refuses a `from` naming someone else."""
    alice, bob = await device(ALICE), await device(BOB)
    await alice.send(BOB, "from alice")
    [got] = (await bob.fetch_inbox()).messages
    assert got.message.sender == ALICE
    forged = codec.encode_message(InstantMessage(MessageId(b"f"), CAROL, BOB, b"I am carol"))
    response = await alice.request(Code.POST, f"/i/{BOB}", forged)
    assert response.code == Code.FORBIDDEN and b"authenticated sender" in response.payload
    assert len((await bob.fetch_inbox()).messages) == 1


async def test_anonymous_subscription_only_when_allowed(device: MakeDevice, anonymous: MakeAnonymous) -> None:
    """5.1.3 (B may allow unauthenticated subscriptions) and 5.1.14 (B may prevent them)."""
    alice, anon = await device(ALICE), await anonymous()
    await alice.publish(FULL)
    watch = Watch(anon, ALICE)
    await eventually(lambda: _true(watch.ended is not None))
    assert watch.ended is not None and watch.ended.code == Code.UNAUTHORIZED
    await alice.put_rules(AccessRules(subscribers=("*", "anonymous")))
    watch = Watch(anon, ALICE)
    try:
        await eventually(lambda: _true(len(watch.docs) == 1))
        assert watch.docs[0].note == "in the lab"
        assert await code_of(anon.fetch_presence(ALICE)) == Code.UNAUTHORIZED  # fetching is a separate right
    finally:
        await watch.stop()


# -- presentity access rules (2.3.1-2.3.4, 5.1.5, 5.1.13, 5.1.15, 5.2.2, 5.2.3) ----------------------


async def test_fetch_and_subscribe_are_controlled_separately(device: MakeDevice) -> None:
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.publish(FULL)
    await alice.put_rules(AccessRules(fetchers=(BOB,), subscribers=(CAROL,)))
    assert (await bob.fetch_presence(ALICE)).note == "in the lab"
    assert await code_of(carol.fetch_presence(ALICE)) == Code.FORBIDDEN
    bob_watch, carol_watch = Watch(bob, ALICE), Watch(carol, ALICE)
    try:
        await eventually(lambda: _true(bob_watch.ended is not None and len(carol_watch.docs) == 1))
        assert bob_watch.ended is not None and bob_watch.ended.code == Code.FORBIDDEN
        assert "refused" in bob_watch.ended.diagnostic  # 5.1.5: A is told B refused
    finally:
        await bob_watch.stop()
        await carol_watch.stop()


async def test_per_watcher_views_apply_to_fetch_and_notification(device: MakeDevice) -> None:
    """2.3.3 / 5.2.3: what each watcher sees, whether fetched or notified."""
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.put_rules(AccessRules(views={BOB: View(Field.NOTE | Field.TEL), CAROL: View(Field(0), note="busy")}))
    await alice.publish(FULL)
    bob_sees, carol_sees = await bob.fetch_presence(ALICE), await carol.fetch_presence(ALICE)
    assert (bob_sees.note, bob_sees.contact, dict(bob_sees.extensions)) == ("in the lab", Contact(tel="+1 555"), {})
    assert (carol_sees.note, carol_sees.contact, carol_sees.status) == ("busy", Contact(), Status.OPEN)
    bob_watch, carol_watch = Watch(bob, ALICE), Watch(carol, ALICE)
    try:
        await eventually(lambda: _true(len(bob_watch.docs) == 1 and len(carol_watch.docs) == 1))
        await alice.publish(PresenceDocument(Status.OPEN, note="coffee", contact=Contact(tel="+1 555", adr="Rome")))
        await eventually(lambda: _true(len(bob_watch.docs) == 2 and len(carol_watch.docs) == 2))
        assert (bob_watch.docs[1].note, bob_watch.docs[1].contact) == ("coffee", Contact(tel="+1 555"))
        assert (carol_watch.docs[1].note, carol_watch.docs[1].contact) == ("busy", Contact())
        # alice herself always sees everything
        assert (await alice.fetch_presence(ALICE)).contact.adr == "Rome"
    finally:
        await bob_watch.stop()
        await carol_watch.stop()


async def test_other_publishers_only_when_allowed(device: MakeDevice) -> None:
    """2.3.4: which other principals may update the presence."""
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    body = codec.encode_presence(PresenceDocument(Status.OPEN, note="set by bob"), for_publish=True)
    assert (await bob.request(Code.PUT, f"/p/{ALICE}", body)).code == Code.FORBIDDEN
    await alice.put_rules(AccessRules(publishers=(BOB,)))
    assert (await bob.request(Code.PUT, f"/p/{ALICE}", body)).code == Code.CHANGED
    assert (await carol.request(Code.PUT, f"/p/{ALICE}", body)).code == Code.FORBIDDEN
    assert (await carol.fetch_presence(ALICE)).note == "set by bob"


async def test_polite_blocking_is_indistinguishable_for_the_watcher(device: MakeDevice) -> None:
    """5.1.15 / 5.2.3: the subscription appears granted, notifications keep the real
    cadence, nothing real is delivered; only the presentity sees the block."""
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.publish(FULL)
    await alice.put_rules(AccessRules(blocked=(BOB,)))
    fetched = await bob.fetch_presence(ALICE)
    assert (fetched.status, fetched.note, fetched.contact) == (Status.CLOSED, None, Contact())
    blocked, normal = Watch(bob, ALICE), Watch(carol, ALICE)
    try:
        await eventually(lambda: _true(len(blocked.docs) == 1 and len(normal.docs) == 1))
        for note in ("one", "two", "three"):
            await alice.publish(PresenceDocument(Status.OPEN, note=note))
            await eventually(lambda n=note: _true(normal.docs[-1].note == n))  # type: ignore[misc]
            await eventually(lambda: _true(len(blocked.docs) == len(normal.docs)))
        assert len(blocked.docs) == len(normal.docs) == 4
        assert all(d.status is Status.CLOSED and d.note is None for d in blocked.docs)
        assert [d.version for d in blocked.docs] == [d.version for d in normal.docs]
        assert blocked.ended is None
        # The watcher's own view of its subscription: active, like any other.
        [status] = [s for s in await bob.subscriptions() if s.presentity == ALICE]
        assert status.state is SubscriptionState.ACTIVE
        # Only alice sees that bob is politely blocked.
        watchers = {w.watcher: w.politely_blocked for w in await alice.watchers()}
        assert watchers == {BOB: True, CAROL: False}
    finally:
        await blocked.stop()
        await normal.stop()


async def test_rules_hold_while_out_of_contact(gateway: Gateway, device: MakeDevice, clock: ManualClock) -> None:
    """2.3 (last paragraph): access decisions do not need the presentity."""
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.put_rules(AccessRules(fetchers=(BOB,), views={BOB: View(Field.NOTE)}))
    await alice.publish(PresenceDocument(Status.OPEN, note="here", contact=Contact(tel="1"), lease=10))
    await alice.close()
    clock.advance(11)

    async def gone() -> bool:
        return (await bob.fetch_presence(ALICE)).out_of_contact

    await eventually(gone)
    seen = await bob.fetch_presence(ALICE)
    assert (seen.status, seen.note, seen.contact) == (Status.CLOSED, "here", Contact())
    assert await code_of(carol.fetch_presence(ALICE)) == Code.FORBIDDEN


async def test_rule_change_ends_a_now_refused_subscription(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    await alice.publish(FULL)
    watch = Watch(bob, ALICE)
    try:
        await eventually(lambda: _true(len(watch.docs) == 1))
        await alice.put_rules(AccessRules(refused=(BOB,)))
        await eventually(lambda: _true(watch.ended is not None))
        assert watch.ended is not None and watch.ended.code == Code.FORBIDDEN
        states = {s.presentity: s.state for s in await bob.subscriptions()}
        assert states[ALICE] is SubscriptionState.REFUSED
    finally:
        await watch.stop()


# -- inbox rules (2.3.5, 2.3.6, 5.4.11) --------------------------------------------------------


async def test_inbox_senders_blocking_and_readers(device: MakeDevice) -> None:
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.put_rules(AccessRules(senders=("*@example.org",), blocked_senders=(CAROL,), readers=(BOB,)))
    await bob.send(ALICE, "bob may send")
    assert await code_of(carol.send(ALICE, "carol is blocked")) == Code.FORBIDDEN  # 5.4.11, told (5.4.1)
    # a delegate may read the inbox (2.3.6); nobody else may
    delegate_view = await bob.request(Code.GET, f"/i/{ALICE}")
    assert delegate_view.code == Code.CONTENT
    assert [m.message.payload for m in codec.decode_batch(delegate_view.payload, ALICE)[0]] == [b"bob may send"]
    assert (await carol.request(Code.GET, f"/i/{ALICE}")).code == Code.FORBIDDEN
    assert (await carol.request(Code.DELETE, f"/i/{ALICE}?c=99")).code == Code.FORBIDDEN
    assert [m.message.payload for m in (await alice.fetch_inbox()).messages] == [b"bob may send"]


async def test_a_block_made_through_another_process_holds_at_once(
    gateway: Gateway, device: MakeDevice, clock: ManualClock, tmp_path: Path
) -> None:
    """Each process keeps the facts of a sender's last accepted IM for the next one; the
    store checks them as it stores. A block made through another process (same store,
    no event bus) refuses the very next IM, and nothing of it is stored."""
    other = await start_gateway(tmp_path / "gw.db", clock, keys=KeyStore(tmp_path / "other-keys"))
    try:
        alice = await device(ALICE)
        bob_elsewhere = await provisioned_device(other, BOB, tmp_path / "other-devices")
        try:
            await alice.send(BOB, "first")
            await alice.send(BOB, "second")  # accepted on the kept facts
            await bob_elsewhere.put_rules(AccessRules(blocked_senders=(ALICE,)))
            assert await code_of(alice.send(BOB, "after the block")) == Code.FORBIDDEN
            await bob_elsewhere.put_rules(AccessRules())
            await alice.send(BOB, "unblocked")
            payloads = [m.message.payload for m in (await bob_elsewhere.fetch_inbox()).messages]
            assert payloads == [b"first", b"second", b"unblocked"]
        finally:
            await bob_elsewhere.close()
    finally:
        await other.close()


async def test_only_the_principal_changes_rules(device: MakeDevice) -> None:
    """An administrator may read rules (to help) but not change them: it could grant
    itself the inbox or presence it must not have."""
    alice, bob, admin = await device(ALICE), await device(BOB), await device(ADMIN)
    rules = AccessRules(blocked=(CAROL,))
    assert (await bob.request(Code.PUT, f"/r/{ALICE}", codec.encode_rules(rules))).code == Code.FORBIDDEN
    assert (await bob.request(Code.GET, f"/r/{ALICE}")).code == Code.FORBIDDEN
    grab = AccessRules(readers=(ADMIN,), publishers=(ADMIN,))
    assert (await admin.request(Code.PUT, f"/r/{ALICE}", codec.encode_rules(grab))).code == Code.FORBIDDEN
    await alice.put_rules(rules)
    assert await alice.get_rules() == rules
    admin_view = await admin.request(Code.GET, f"/r/{ALICE}")
    assert admin_view.code == Code.CONTENT and codec.decode_rules(admin_view.payload) == rules
    bad = cbor2.dumps({0: ["not a pattern"]})
    assert (await alice.request(Code.PUT, f"/r/{ALICE}", bad)).code == Code.BAD_REQUEST
    assert await alice.get_rules() == rules  # nothing stored from bad input


async def test_a_narrowed_view_invalidates_the_old_etag(device: MakeDevice) -> None:
    """3.3.3: a cached or revalidated copy never outlives a rule change."""
    alice, bob = await device(ALICE), await device(BOB)
    await alice.publish(FULL)
    full = await bob.request(Code.GET, f"/p/{ALICE}")
    await alice.put_rules(AccessRules(views={BOB: View(Field(0))}))
    again = await bob.request(Code.GET, f"/p/{ALICE}", etags=[full.opt.etag])
    assert again.code == Code.CONTENT and again.opt.etag != full.opt.etag
    assert codec.decode_presence_view(again.payload).note is None
    await alice.put_rules(AccessRules(blocked=(BOB,)))
    blocked = await bob.request(Code.GET, f"/p/{ALICE}", etags=[full.opt.etag, again.opt.etag])
    assert blocked.code == Code.CONTENT and codec.decode_presence_view(blocked.payload).status is Status.CLOSED


async def test_anonymous_cannot_tell_which_users_exist(anonymous: MakeAnonymous) -> None:
    anon = await anonymous()
    for user in (ALICE, "nobody@example.org"):
        assert (await anon.request(Code.GET, f"/p/{user}")).code == Code.UNAUTHORIZED
        assert (await anon.request(Code.GET, f"/w/{user}")).code == Code.UNAUTHORIZED


# -- subscriptions: status, watchers, cancellation (5.1.6-5.1.11, 5.1.16) -----------------------------


async def test_watchers_subscriptions_and_cancellation(device: MakeDevice) -> None:
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.publish(FULL)
    watch = Watch(bob, ALICE)
    try:
        await eventually(lambda: _true(len(watch.docs) == 1))
        # B learns about A's subscription (5.1.11), A sees its status (5.1.10)
        assert [w.watcher for w in await alice.watchers()] == [BOB]
        assert [(s.presentity, s.state) for s in await bob.subscriptions()] == [(ALICE, SubscriptionState.ACTIVE)]
        # no third party can see (5.1.2) or cancel (5.1.8) it
        assert (await carol.request(Code.GET, f"/w/{ALICE}")).code == Code.FORBIDDEN
        assert (await carol.request(Code.GET, f"/s/{BOB}")).code == Code.FORBIDDEN
        assert (await carol.request(Code.DELETE, f"/w/{ALICE}?u={BOB}")).code == Code.FORBIDDEN
        assert [w.watcher for w in await alice.watchers()] == [BOB]
        # B cancels A's subscription at will (5.1.16); A is told (5.1.9)
        await alice.cancel_watcher(BOB)
        await eventually(lambda: _true(watch.ended is not None))
        assert watch.ended is not None and watch.ended.code == Code.FORBIDDEN and "cancelled" in watch.ended.diagnostic
        assert await alice.watchers() == []
        assert [(s.presentity, s.state) for s in await bob.subscriptions()] == [
            (ALICE, SubscriptionState.CANCELLED_BY_PRESENTITY)
        ]
        assert (await alice.request(Code.DELETE, f"/w/{ALICE}?u={BOB}")).code == Code.NOT_FOUND
    finally:
        await watch.stop()


async def test_administrator_powers_and_limits(device: MakeDevice) -> None:
    """An administrator manages rules and subscriptions; it cannot read inboxes,
    publish for others or send as others."""
    alice, bob, admin = await device(ALICE), await device(BOB), await device(ADMIN)
    await alice.publish(FULL)
    await bob.send(ALICE, "private")
    watch = Watch(bob, ALICE)
    try:
        await eventually(lambda: _true(len(watch.docs) == 1))
        assert [w.watcher for w in await admin.watchers(ALICE)] == [BOB]
        await admin.cancel_watcher(BOB, user=ALICE)
        await eventually(lambda: _true(watch.ended is not None))
        states = {s.presentity: s.state for s in await bob.subscriptions()}
        assert states[ALICE] is SubscriptionState.CANCELLED_BY_ADMINISTRATOR
    finally:
        await watch.stop()
    assert (await admin.request(Code.GET, f"/i/{ALICE}")).code == Code.FORBIDDEN
    assert (await admin.request(Code.GET, f"/o/{ALICE}")).code == Code.FORBIDDEN
    publish = codec.encode_presence(PresenceDocument(Status.CLOSED), for_publish=True)
    assert (await admin.request(Code.PUT, f"/p/{ALICE}", publish)).code == Code.FORBIDDEN
    # an administrator is subject to the presentity's rules like any watcher
    await alice.put_rules(AccessRules(refused=(ADMIN,)))
    assert (await admin.request(Code.GET, f"/p/{ALICE}")).code == Code.FORBIDDEN
    assert (await bob.request(Code.GET, f"/w/{ALICE}")).code == Code.FORBIDDEN  # bob is no administrator


# -- attacks on real traffic ---------------------------------------------------------------------


async def test_third_party_context_cannot_act_for_another(device: MakeDevice) -> None:
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await bob.send(ALICE, "for alice only")
    publish = codec.encode_presence(PresenceDocument(Status.OPEN, note="spoof"), for_publish=True)
    assert (await carol.request(Code.PUT, f"/p/{BOB}", publish)).code == Code.FORBIDDEN
    assert (await carol.request(Code.GET, f"/i/{ALICE}")).code == Code.FORBIDDEN
    assert (await carol.request(Code.GET, f"/o/{BOB}")).code == Code.FORBIDDEN
    assert (await carol.request(Code.PUT, f"/k/{BOB}", cbor2.dumps({0: b"k"}))).code == Code.FORBIDDEN
    assert (await bob.fetch_presence(BOB)).note is None
    assert [m.message.payload for m in (await alice.fetch_inbox()).messages] == [b"for alice only"]


async def test_replayed_protected_request_is_rejected(gateway: Gateway, device: MakeDevice, tmp_path: Path) -> None:
    """5.4.x / 2.5.2: a captured OSCORE request re-sent (with a fresh message id, so the
    CoAP duplicate cache does not answer it) is refused and has no second effect."""
    bob = await device(BOB)
    creds = keystore_of(gateway).provision(ALICE, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        body = codec.encode_message(InstantMessage(MessageId(b"r1"), ALICE, BOB, b"pay 10"), include_from=False)
        captured = raw.datagram(Message(code=Code.POST, uri_path=["i", BOB], payload=body), b"\x01")
        await raw.send_raw(captured)
        assert (await raw.receive(b"\x01")).code == Code.CREATED
        replay = bytearray(captured)
        replay[2:4] = (0xBEEF).to_bytes(2, "big")  # new message id, same protected content
        await raw.send_raw(bytes(replay))
        answer = Message.decode(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw.sock, 2048), 5))
        assert answer.code == Code.UNAUTHORIZED and b"Replay" in answer.payload
    finally:
        raw.close()
    assert [m.message.payload for m in (await bob.fetch_inbox()).messages] == [b"pay 10"]


async def test_a_retransmission_is_answered_from_the_duplicate_cache_for_the_exchange_lifetime(
    device: MakeDevice, clock: ManualClock, tmp_path: Path
) -> None:
    """``serve --exchange-lifetime``: within it a retransmitted request (same message id)
    gets the very same answer without running again; after it the request is forgotten,
    and the protected one is then refused as a replay, still without a second effect."""
    gateway = await start_gateway(tmp_path / "short.db", clock, exchange_lifetime=0.5)
    assert gateway.duplicates is not None and gateway.duplicates.exchange_lifetime == 0.5
    creds = keystore_of(gateway).provision(ALICE, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        body = codec.encode_message(InstantMessage(MessageId(b"d1"), ALICE, BOB, b"once"), include_from=False)
        captured = raw.datagram(Message(code=Code.POST, uri_path=["i", BOB], payload=body), b"\x01")
        loop = asyncio.get_running_loop()
        await raw.send_raw(captured)
        first = await asyncio.wait_for(loop.sock_recv(raw.sock, 2048), 5)
        assert Message.decode(first).opt.oscore is not None  # a protected answer (the 2.01 inside)
        assert len(gateway.duplicates) >= 1
        await raw.send_raw(captured)
        assert await asyncio.wait_for(loop.sock_recv(raw.sock, 2048), 5) == first  # the same bytes, from the cache
        await eventually(lambda: _true(len(gateway.duplicates) == 0), timeout=3)
        await raw.send_raw(captured)
        forgotten = Message.decode(await asyncio.wait_for(loop.sock_recv(raw.sock, 2048), 5))
        assert forgotten.code == Code.UNAUTHORIZED and b"Replay" in forgotten.payload, forgotten
        assert len(await gateway.service.store.pending(BOB, Seq(0), 10)) == 1
    finally:
        raw.close()
        await gateway.close()


async def test_a_context_another_process_holds_gets_503_not_a_crash(
    gateway: Gateway, device: MakeDevice, clock: ManualClock, tmp_path: Path
) -> None:
    """Two gateway processes on one key directory and no event bus between them (a
    misconfiguration: ``--workers`` needs one). The one that does not hold a device's
    context cannot ask for it: an unprotected 5.03 with Max-Age 1 and a diagnostic,
    after which the device tries again; the holder goes on serving the device."""
    other = await start_gateway(tmp_path / "other.db", clock, keys=keystore_of(gateway))
    assert other.handoff is not None
    other.handoff.WAIT_SECONDS = 0.2
    try:
        alice = await device(ALICE)
        await alice.publish(PresenceDocument(Status.OPEN, note="here"))
        creds = alice.context.client_credentials
        creds[f"coap://127.0.0.1:{other.port}/*"] = creds[f"coap://127.0.0.1:{gateway.port}/*"]
        via_other = DeviceClient(alice.context, f"coap://127.0.0.1:{other.port}", ALICE, timeout=2, compact=True)
        with pytest.raises(NotAProtectedMessage) as refused:
            await via_other.fetch_presence(ALICE)
        plain: Message = refused.value.plain_message
        assert (plain.code, plain.opt.max_age) == (Code.SERVICE_UNAVAILABLE, 1), plain
        assert b"in use by another gateway process" in plain.payload
        assert other.handoff.busy_answers == 2  # answered, waited its Max-Age, tried again
        assert (await alice.fetch_presence(ALICE)).note == "here"
    finally:
        await other.close()


async def test_a_replayed_notification_is_dropped(gateway: Gateway, device: MakeDevice) -> None:
    """2.5.2: a recorded presence notification re-sent later from the gateway's address
    (under a new message id, so CoAP's duplicate detection does not catch it) is not
    taken as news: its OSCORE Partial IV is not above the last one (RFC 8613 7.4.1).
    Without that check aiocoap 0.4.17 delivers it, 128 s after the last notification."""
    alice, bob = await device(ALICE), await device(BOB)
    # RFC 7641's reordering rule, which aiocoap applies, takes any notification as news
    # once 128 s passed since the last one (a quiet presentity): start there.
    bob.tuning = TransportTuning()
    bob.tuning.OBSERVATION_RESET_TIME = 0
    transport = gateway._udp_transport()
    sent: list[tuple[bytes, Any]] = []
    original_send = transport.sendmsg

    def recording_send(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        sent.append((bytes(data), address))
        original_send(data, ancdata, flags, address)

    transport.sendmsg = recording_send
    notes: list[str | None] = []

    async def watch() -> None:
        async for doc in bob.watch(ALICE):
            notes.append(doc.note)

    watching = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(notes == [None]))
        await alice.publish(PresenceDocument(Status.OPEN, note="one"))
        await eventually(lambda: _true(notes[-1:] == ["one"]))
        recorded = [(d, a) for d, a in sent if Message.decode(d).opt.observe is not None]
        datagram, bob_address = recorded[-1]
        await alice.publish(PresenceDocument(Status.OPEN, note="two"))
        await eventually(lambda: _true(notes[-1:] == ["two"]))
        replay = bytearray(datagram)
        replay[2:4] = (int.from_bytes(replay[2:4], "big") ^ 0x5A5A).to_bytes(2, "big")  # a new message id
        gateway_socket = gateway._udp_socket()
        with socket.socket(gateway_socket.family, socket.SOCK_DGRAM) as attacker:
            attacker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            attacker.bind(gateway_socket.getsockname())  # the gateway's own address and port
            attacker.sendto(bytes(replay), bob_address)
        await asyncio.sleep(0.5)
        assert notes == [None, "one", "two"]  # without the check: [..., "two", "one"]
        assert bob.replayed_notifications == 1
    finally:
        transport.sendmsg = original_send
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_flipped_bit_is_rejected(gateway: Gateway, device: MakeDevice, tmp_path: Path) -> None:
    """2.5.1 / 5.4.7: any change to the protected payload is detected; nothing is stored."""
    bob = await device(BOB)
    creds = keystore_of(gateway).provision(ALICE, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        body = codec.encode_message(InstantMessage(MessageId(b"b1"), ALICE, BOB, b"pay 10"), include_from=False)
        datagram = bytearray(raw.datagram(Message(code=Code.POST, uri_path=["i", BOB], payload=body), b"\x02"))
        datagram[-3] ^= 0x01  # inside the ciphertext
        await raw.send_raw(bytes(datagram))
        answer = Message.decode(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw.sock, 2048), 5))
        assert answer.code.is_successful() is False and answer.code in (Code.BAD_REQUEST, Code.BAD_OPTION)
    finally:
        raw.close()
    assert (await bob.fetch_inbox()).messages == []


async def test_unknown_or_revoked_key_is_refused(gateway: Gateway, device: MakeDevice, tmp_path: Path) -> None:
    alice = await device(ALICE)
    await alice.publish(FULL)
    creds = keystore_of(gateway).provision(CAROL, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        ok = await raw.exchange(Message(code=Code.GET, uri_path=["p", ALICE]), b"\x03")
        assert ok.code == Code.CONTENT
        assert keystore_of(gateway).revoke(CAROL) == [creds.kid]
        await raw.send_raw(raw.datagram(Message(code=Code.GET, uri_path=["p", ALICE]), b"\x04"))
        answer = Message.decode(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw.sock, 2048), 5))
        assert answer.code == Code.UNAUTHORIZED and answer.opt.oscore is None
    finally:
        raw.close()


async def test_spoofed_notification_is_detected(gateway: Gateway, device: MakeDevice, tmp_path: Path) -> None:
    """5.2.4 / 5.3.3: a notification about alice that did not come from the gateway
    (same token, forged content) fails OSCORE verification at the watcher."""
    from aiocoap.oscore import ProtectionInvalid

    alice = await device(ALICE)
    await alice.publish(FULL)
    creds = keystore_of(gateway).provision(BOB, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        await raw.send_raw(raw.datagram(Message(code=Code.GET, observe=0, uri_path=["p", ALICE]), b"\x05"))
        genuine_bytes = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw.sock, 2048), 5)
        genuine = Message.decode(genuine_bytes)
        forged = Message.decode(genuine_bytes)
        forged.payload = bytes(genuine.payload[:-1]) + bytes([genuine.payload[-1] ^ 0x80])
        with pytest.raises(ProtectionInvalid):
            assert raw.security is not None
            raw.security.unprotect(forged, raw.request_ids[b"\x05"])
        assert raw.security is not None
        inner, _ = raw.security.unprotect(genuine, raw.request_ids[b"\x05"])
        assert codec.decode_presence_view(inner.payload).note == "in the lab"
    finally:
        raw.close()


async def test_no_ip_addresses_are_disclosed(device: MakeDevice) -> None:
    """5.1.17, 5.1.18, 5.2.5, 5.2.6, 5.4.5: principals see identities, never addresses."""
    alice, bob = await device(ALICE), await device(BOB)
    await alice.publish(FULL)
    await bob.send(ALICE, "hi")
    watch = Watch(bob, ALICE)
    try:
        await eventually(lambda: _true(len(watch.docs) == 1))
        payloads = [
            (await alice.request(Code.GET, f"/w/{ALICE}")).payload,
            (await bob.request(Code.GET, f"/s/{BOB}")).payload,
            (await bob.request(Code.GET, f"/p/{ALICE}")).payload,
            (await alice.request(Code.GET, f"/i/{ALICE}")).payload,
            (await bob.request(Code.GET, f"/o/{BOB}")).payload,
        ]
    finally:
        await watch.stop()
    for payload in payloads:
        assert b"127.0.0.1" not in payload and b"::1" not in payload and b"\x7f\x00\x00\x01" not in payload


async def test_signed_and_encrypted_im_through_the_gateway(gateway: Gateway, device: MakeDevice) -> None:
    """5.4.9 (A signs M), 5.4.3 (B verifies A sent it), 5.4.6 (no C, not even the gateway,
    reads M), 5.4.7 (tampering detected): keys published at /k, COSE on the payload."""
    from gateway import e2e

    alice, bob = await device(ALICE), await device(BOB)
    a_sign, a_agree = e2e.SigningKey.generate(), e2e.AgreementKey.generate()
    b_sign, b_agree = e2e.SigningKey.generate(), e2e.AgreementKey.generate()
    await alice.publish_keys(e2e.KeyBundle.of(a_sign, a_agree).encode())
    await bob.publish_keys(e2e.KeyBundle.of(b_sign, b_agree).encode())

    # Alice fetches Bob's published keys and seals (signs, then encrypts) for him.
    bob_bundle = e2e.KeyBundle.decode(await alice.fetch_keys(BOB))
    secret = b"the door code is 4711"
    sealed = e2e.seal(secret, a_sign, a_agree, bob_bundle)
    await alice.send(BOB, sealed, content_format=e2e.CONTENT_FORMAT_COSE_ENCRYPT0)
    signed = a_sign.sign(b"signed, not secret")
    await alice.send(BOB, signed, content_format=e2e.CONTENT_FORMAT_COSE_SIGN1)

    # The gateway's store holds ciphertext only.
    stored, _ = await gateway.service.fetch_inbox(BOB, BOB, 0, 4096)
    assert all(secret not in q.message.payload for q in stored)

    alice_bundle = e2e.KeyBundle.decode(await bob.fetch_keys(ALICE))
    first, second = (await bob.fetch_inbox()).messages
    assert first.message.content_format == e2e.CONTENT_FORMAT_COSE_ENCRYPT0
    assert e2e.open_sealed(first.message.payload, alice_bundle, b_agree) == secret
    assert e2e.verify(second.message.payload, alice_bundle.signing) == b"signed, not secret"
    tampered = bytearray(second.message.payload)
    tampered[-1] ^= 1
    with pytest.raises(e2e.VerificationError):
        e2e.verify(bytes(tampered), alice_bundle.signing)
    # keys are public, but only their owner may replace them
    anyone_else = await device(CAROL)
    assert await anyone_else.fetch_keys(ALICE) == e2e.KeyBundle.of(a_sign, a_agree).encode()
    assert (await anyone_else.request(Code.PUT, f"/k/{ALICE}", e2e.KeyBundle.of(b_sign, b_agree).encode())).code == (
        Code.FORBIDDEN
    )


async def test_polite_block_etag_gives_nothing_away(device: MakeDevice) -> None:
    """A blocked watcher of a presentity that is really CLOSED gets exactly what an
    unblocked watcher gets: same body, same ETag."""
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    await alice.publish(PresenceDocument(Status.CLOSED))
    await alice.put_rules(AccessRules(blocked=(BOB,)))
    blocked, normal = await bob.request(Code.GET, f"/p/{ALICE}"), await carol.request(Code.GET, f"/p/{ALICE}")
    assert (blocked.payload, blocked.opt.etag) == (normal.payload, normal.opt.etag)


async def test_signed_presence_document(device: MakeDevice) -> None:
    """5.1.4 / 5.3.1 / 5.3.3: a watcher verifies the presence information is the
    presentity's own, beyond the gateway's word; a change by anyone else fails."""
    from gateway import e2e

    alice, bob = await device(ALICE), await device(BOB)
    key = e2e.SigningKey.generate()
    await alice.publish_keys(e2e.KeyBundle.of(key, e2e.AgreementKey.generate()).encode())
    signed = e2e.sign_presence(PresenceDocument(Status.OPEN, note="signed by alice", lease=300), ALICE, key)
    await alice.publish(signed)
    bundle = e2e.KeyBundle.decode(await bob.fetch_keys(ALICE))
    seen = await bob.fetch_presence(ALICE)
    e2e.verify_presence(seen, ALICE, bundle.signing)  # the gateway's own fields are not covered
    from dataclasses import replace

    for forged in (replace(seen, note="forged"), replace(seen, status=Status.CLOSED)):
        with pytest.raises(e2e.VerificationError):
            e2e.verify_presence(forged, ALICE, bundle.signing)
    with pytest.raises(e2e.VerificationError):
        e2e.verify_presence(seen, BOB, bundle.signing)  # not transferable to another presentity


async def test_each_domain_has_its_own_administrators(tmp_path: Path) -> None:
    """RFC 2779 2.1.4: one gateway serving two domains; an administrator of one has no
    power over the users of the other."""
    from gateway.keys import KeyStore

    olga, other_root = UserId("olga@other.example"), UserId("root@other.example")
    keys = KeyStore(tmp_path / "keys")
    gateway = await Gateway.start(
        bind=("127.0.0.1", 0),
        store=f"sqlite:{tmp_path / 'gw.db'}",
        domains=["example.org", "other.example"],
        keys=keys,
        admins=[ADMIN, other_root],
    )
    clients = []
    try:
        for user in (ALICE, olga, ADMIN, other_root):
            await gateway.service.register(UserRecord(user))
        uri = f"coap://127.0.0.1:{gateway.port}"
        for user in (ADMIN, other_root):
            creds = keys.provision(user, tmp_path / "devices", uri)
            clients.append(await DeviceClient.create(uri, user, timeout=10, credentials=creds.credentials_file))
        root, other = clients
        assert (await root.request(Code.GET, f"/r/{ALICE}")).code == Code.CONTENT
        assert (await other.request(Code.GET, f"/r/{olga}")).code == Code.CONTENT
        for admin, user in ((root, olga), (other, ALICE)):
            for path in (f"/r/{user}", f"/w/{user}", f"/s/{user}"):
                response = await admin.request(Code.GET, path)
                assert response.code == Code.FORBIDDEN, (admin.user, path)
    finally:
        for client in clients:
            await client.close()
        await gateway.close()
