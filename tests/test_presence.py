"""Presence over real UDP: fetch, publish, subscribe (Observe), cancel, leases, link loss."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import Code, Message

from device_sim.client import DeviceClient, RequestFailed
from gateway.app import Gateway
from gateway.core import codec, presence
from gateway.core.access import AccessRules
from gateway.core.ids import UserId
from gateway.core.model import Contact, PresenceDocument, Status, UserRecord

from .conftest import ALICE, BOB, CAROL, INBOX_ONLY, PRESENCE_ONLY, ManualClock, eventually, keystore_of
from .rawcoap import RawDevice

MakeDevice = Callable[..., Awaitable[DeviceClient]]


async def test_fetch_unpublished_presentity_is_closed(device: MakeDevice) -> None:
    bob = await device(BOB)
    doc = await bob.fetch_presence(ALICE)
    assert doc.status is Status.CLOSED and doc.version == 0


async def test_publish_then_fetch_keeps_all_fields(device: MakeDevice, clock: ManualClock) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    published = PresenceDocument(
        Status.OPEN,
        note="Grüße 👋",
        contact=Contact(tel="+49 30 1", email="alice@example.org", url="https://a.example", adr="Berlin"),
        extensions={"mood": "calm", 900: [1, 2]},
        lease=120,
    )
    etag = await alice.publish(published)
    got = await bob.fetch_presence(ALICE)
    assert (got.status, got.note, got.contact, dict(got.extensions), got.lease) == (
        published.status,
        published.note,
        published.contact,
        {"mood": "calm", 900: [1, 2]},
        120,
    )
    assert got.timestamp == int(clock.now) and got.version == 1
    # ETag: the version, then two bytes of a hash of the representation
    assert etag == b"\x01" + presence.representation_tag(codec.encode_presence(got))


async def test_etag_revalidation_and_max_age(gateway: Gateway, device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    await alice.publish(PresenceDocument(Status.OPEN, lease=30))
    first = await bob.request(Code.GET, f"/p/{ALICE}")
    assert first.opt.max_age == 30 and first.opt.etag == b"\x01" + presence.representation_tag(first.payload)
    again = await bob.request(Code.GET, f"/p/{ALICE}", etags=[first.opt.etag])
    assert again.code == Code.VALID and again.payload == b""
    await alice.publish(PresenceDocument(Status.CLOSED))
    changed = await bob.request(Code.GET, f"/p/{ALICE}", etags=[first.opt.etag])
    assert changed.code == Code.CONTENT and changed.opt.etag == b"\x02" + presence.representation_tag(changed.payload)


async def test_every_change_is_notified_to_every_watcher(device: MakeDevice) -> None:
    alice, bob, carol = await device(ALICE), await device(BOB), await device("carol@example.org")
    seen: dict[str, list[str | None]] = {"bob": [], "carol": []}

    async def watch(client: DeviceClient, name: str, count: int) -> None:
        async for doc in client.watch(ALICE):
            seen[name].append(doc.note)
            if len(seen[name]) == count:
                return

    watchers = [asyncio.create_task(watch(bob, "bob", 4)), asyncio.create_task(watch(carol, "carol", 4))]
    await eventually(lambda: _true(len(seen["bob"]) == 1 and len(seen["carol"]) == 1))
    for note in ("one", "two", "three"):
        await alice.publish(PresenceDocument(Status.OPEN, note=note))
        # Observe keeps only the latest state: wait for it before the next change,
        # as a watcher on a slow link would.
        await eventually(lambda n=note: _true(seen["bob"][-1] == n and seen["carol"][-1] == n))  # type: ignore[misc]
    await asyncio.wait_for(asyncio.gather(*watchers), 5)
    assert seen["bob"] == seen["carol"] == [None, "one", "two", "three"]


async def _true(value: bool) -> bool:
    return value


async def test_deregistration_cancels_subscription(gateway: Gateway, device: MakeDevice) -> None:
    """RFC 7641 3.6: a GET with Observe=1 and the subscription's token ends it. Sent from
    a raw socket, as a constrained device would (aiocoap's client cancel() sends
    nothing, #13); unprotected, so alice first allows anonymous subscribers (5.1.3)."""
    alice = await device(ALICE)
    await alice.put_rules(AccessRules(subscribers=("*", "anonymous")))
    raw = RawDevice(gateway.port)
    try:
        registered = await raw.exchange(Message(code=Code.GET, observe=0, uri_path=["p", ALICE]), b"\x07")
        assert registered.code == Code.CONTENT and registered.opt.observe == 0
        assert gateway.presence.observation_count() == 1
        deregistered = await raw.exchange(Message(code=Code.GET, observe=1, uri_path=["p", ALICE]), b"\x07")
        assert deregistered.code == Code.CONTENT and deregistered.opt.observe is None
        await eventually(lambda: _true(gateway.presence.observation_count() == 0))
        await alice.publish(PresenceDocument(Status.OPEN, note="after cancel"))
        with pytest.raises(TimeoutError):
            await raw.receive(b"\x07", timeout=0.5)
    finally:
        raw.close()


async def test_lease_expiry_turns_presentity_out_of_contact_and_notifies(
    gateway: Gateway, device: MakeDevice, clock: ManualClock
) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    await alice.publish(PresenceDocument(Status.OPEN, note="here", lease=60))
    docs: list[PresenceDocument] = []

    async def watch() -> None:
        async for doc in bob.watch(ALICE):
            docs.append(doc)

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: _true(len(docs) == 1))
        clock.advance(59)
        await asyncio.sleep(0.3)
        assert len(docs) == 1 and docs[0].status is Status.OPEN
        clock.advance(1)
        await eventually(lambda: _true(len(docs) == 2))
        assert docs[1].status is Status.CLOSED and docs[1].out_of_contact and docs[1].note == "here"
        # Publishing again brings it back in contact.
        await alice.publish(PresenceDocument(Status.OPEN, lease=60))
        await eventually(lambda: _true(len(docs) == 3))
        assert docs[2].status is Status.OPEN and not docs[2].out_of_contact
    finally:
        task.cancel()


async def test_failed_notifications_mark_device_out_of_contact(gateway: Gateway, device: MakeDevice) -> None:
    """A device that vanishes without goodbye: its inbox notification bounces (ICMP port
    unreachable on loopback), the observation ends, and watchers see it out of contact."""
    bob = await device(BOB)
    phone = await device(ALICE)
    await phone.publish(PresenceDocument(Status.OPEN, note="online", lease=3600))
    inbox = phone.context.request(Message(code=Code.GET, uri=f"{phone.base}/i/{ALICE}", observe=0))
    await asyncio.wait_for(inbox.response, 5)
    assert gateway.inbox.observation_count() == 1
    await phone.close()  # the radio is gone: its socket closes, nothing is said
    await bob.send(ALICE, "are you there?")  # triggers a notification to the vanished device

    async def out_of_contact() -> bool:
        return (await bob.fetch_presence(ALICE)).out_of_contact

    await eventually(out_of_contact, timeout=10)
    assert gateway.counters.out_of_contact_by_link_loss == 1
    # The message itself waits in the store for the device's return.
    waiting, _ = await gateway.service.fetch_inbox(ALICE, ALICE, 0, 4096)
    assert [m.message.payload for m in waiting] == [b"are you there?"]


async def test_withdraw_is_graceful_not_out_of_contact(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    await alice.publish(PresenceDocument(Status.OPEN, lease=60))
    await alice.withdraw()
    doc = await bob.fetch_presence(ALICE)
    assert doc.status is Status.CLOSED and not doc.out_of_contact and doc.version == 2


async def test_presence_and_inbox_are_independent(device: MakeDevice) -> None:
    """RFC 2779 2.1.1-2.1.3: an inbox without a presentity, a presentity without an inbox."""
    sender, sensor = await device(BOB), await device(PRESENCE_ONLY)
    await sender.send(INBOX_ONLY, "for the desk")
    with pytest.raises(RequestFailed) as no_presentity:
        await sender.fetch_presence(INBOX_ONLY)
    assert no_presentity.value.code == Code.NOT_FOUND and "presentity" in no_presentity.value.diagnostic
    await sensor.publish(PresenceDocument(Status.OPEN, note="22.5 C"))
    assert (await sender.fetch_presence(PRESENCE_ONLY)).note == "22.5 C"
    with pytest.raises(RequestFailed) as no_inbox:
        await sender.send(PRESENCE_ONLY, "hello sensor")
    assert no_inbox.value.code == Code.NOT_FOUND and "inbox" in no_inbox.value.diagnostic
    # ... and one identifier may name both (2.1.4).
    await sender.send(ALICE, "inbox")
    assert (await sender.fetch_presence(ALICE)).status is Status.CLOSED


@pytest.mark.parametrize(
    ("method", "path", "payload", "code", "diagnostic"),
    [
        (Code.GET, "/p/nobody@example.org", b"", Code.NOT_FOUND, "unknown user"),
        (Code.GET, "/p/alice@elsewhere.net", b"", Code.NOT_FOUND, "domain"),
        (Code.GET, "/p/bad!id", b"", Code.NOT_FOUND, "user@domain"),
        (Code.GET, "/p/alice@example.org/extra", b"", Code.NOT_FOUND, "path"),
        (Code.GET, "/nothing", b"", Code.NOT_FOUND, ""),
        (Code.PUT, "/p/alice@example.org", b"\xff\x00", Code.BAD_REQUEST, "malformed"),
        (Code.PUT, "/p/alice@example.org", cbor2.dumps({0: "open"}), Code.BAD_REQUEST, "status"),
        (Code.PUT, "/p/alice@example.org", b"\xa0" * 5000, Code.REQUEST_ENTITY_TOO_LARGE, ""),
        (Code.PATCH, "/p/alice@example.org", b"", Code.METHOD_NOT_ALLOWED, "not allowed"),
        (Code.GET, "/p/alice@example.org?x=1", b"", Code.BAD_REQUEST, "query"),
    ],
)
async def test_bad_requests_get_clear_4xx(
    device: MakeDevice, method: Code, path: str, payload: bytes, code: Code, diagnostic: str
) -> None:
    bob = await device(BOB)
    response = await bob.request(method, path, payload)
    assert response.code == code
    assert diagnostic in response.payload.decode("utf-8", "replace")


async def test_wrong_content_format_and_accept(device: MakeDevice) -> None:
    bob = await device(BOB)
    body = codec.encode_presence(PresenceDocument(Status.OPEN), for_publish=True)
    put = await bob.request(Code.PUT, f"/p/{BOB}", body, content_format=50)
    assert put.code == Code.UNSUPPORTED_CONTENT_FORMAT
    get = await bob.request(Code.GET, f"/p/{BOB}", accept=50)
    assert get.code == Code.NOT_ACCEPTABLE


async def test_well_known_core_lists_resources(gateway: Gateway) -> None:
    ctx = await aiocoap.Context.create_client_context()
    try:
        response = await asyncio.wait_for(
            ctx.request(Message(code=Code.GET, uri=f"coap://127.0.0.1:{gateway.port}/.well-known/core")).response, 5
        )
    finally:
        await ctx.shutdown()
    text = response.payload.decode()
    for needle in (
        '</p/{user}>;rt="impp.presence";if="core.p";obs',
        '</i/{user}>;rt="impp.inbox";if="core.b"',
        '</o/{user}>;rt="impp.receipts";if="core.s"',
    ):
        assert needle in text


async def test_if_match_publishes_only_over_the_version_seen(device: MakeDevice) -> None:
    alice = await device(ALICE)
    first = await alice.publish(PresenceDocument(Status.OPEN, note="v1"))
    body = codec.encode_presence(PresenceDocument(Status.OPEN, note="v2"), for_publish=True)
    ok = await alice.request(Code.PUT, f"/p/{ALICE}", body, if_match=[first])
    assert ok.code == Code.CHANGED and ok.opt.etag[:1] == b"\x02" and ok.opt.etag != first
    stale = await alice.request(Code.PUT, f"/p/{ALICE}", body, if_match=[first])
    assert stale.code == Code.PRECONDITION_FAILED
    assert (await alice.fetch_presence(ALICE)).note == "v2"


async def test_unknown_critical_option_is_4_02(gateway: Gateway) -> None:
    from aiocoap.numbers.optionnumbers import OptionNumber
    from aiocoap.optiontypes import OpaqueOption

    ctx = await aiocoap.Context.create_client_context()
    try:
        request = Message(code=Code.GET, uri=f"coap://127.0.0.1:{gateway.port}/p/{ALICE}")
        request.opt.add_option(OpaqueOption(OptionNumber(65001), b"x"))  # odd number: critical
        response = await asyncio.wait_for(ctx.request(request).response, 5)
    finally:
        await ctx.shutdown()
    assert response.code == Code.BAD_OPTION and b"65001" in response.payload


async def test_inbox_deregistration_is_a_graceful_goodbye(gateway: Gateway, device: MakeDevice, tmp_path: Path) -> None:
    """RFC 7641 3.6 deregistration ends the inbox observation without marking the
    device out of contact (only failed notifications do). OSCORE from a raw socket."""
    alice = await device(ALICE)
    await alice.publish(PresenceDocument(Status.OPEN, lease=3600))
    creds = keystore_of(gateway).provision(ALICE, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        for observe in (0, 1):
            response = await raw.exchange(Message(code=Code.GET, observe=observe, uri_path=["i", ALICE]), b"\x09")
            assert response.code == Code.CONTENT
        await eventually(lambda: _true(gateway.inbox.observation_count() == 0))
    finally:
        raw.close()
    await asyncio.sleep(gateway.link_loss_grace + 0.3)
    doc = await alice.fetch_presence(ALICE)
    assert doc.status is Status.OPEN and not doc.out_of_contact
    assert gateway.counters.out_of_contact_by_link_loss == 0


async def test_presence_notifications_are_non_with_a_periodic_con(
    gateway: Gateway, device: MakeDevice, tmp_path: Path
) -> None:
    """A watcher that asks (``?n``) gets NON notifications (no ACK on the air, no queue
    behind a lost one) with every CON_EVERY-th confirmable, so a vanished watcher is
    still found (RFC 7641 4.5); others keep CON notifications."""
    from gateway.coap.resources import CON_EVERY

    alice = await device(ALICE)
    creds = keystore_of(gateway).provision(BOB, tmp_path / "raw", "coap://unused")
    raw = RawDevice(gateway.port, creds.context_dir)
    try:
        first = await raw.exchange(Message(code=Code.GET, observe=0, uri_path=["p", ALICE], uri_query=["n"]), b"\x05")
        assert first.code == Code.CONTENT
        kinds = []
        for i in range(CON_EVERY + 2):
            await alice.publish(PresenceDocument(Status.OPEN, note=f"n{i}"))
            notification = await raw.receive(b"\x05")  # ACKs a CON itself
            assert codec.decode_presence_view(notification.payload).note == f"n{i}"
            kinds.append(raw.last_mtype)
    finally:
        raw.close()
    assert kinds == [aiocoap.NON] * (CON_EVERY - 1) + [aiocoap.CON] + [aiocoap.NON] * 2
    # without ?n a watcher keeps confirmable notifications
    plain = RawDevice(gateway.port, keystore_of(gateway).provision(BOB, tmp_path / "raw2", "coap://unused").context_dir)
    try:
        assert (await plain.exchange(Message(code=Code.GET, observe=0, uri_path=["p", ALICE]), b"\x06")).code == (
            Code.CONTENT
        )
        await alice.publish(PresenceDocument(Status.OPEN, note="confirmable"))
        assert codec.decode_presence_view((await plain.receive(b"\x06")).payload).note == "confirmable"
        assert plain.last_mtype == aiocoap.CON
    finally:
        plain.close()


async def test_a_watch_the_device_stops_ends_at_the_gateway(gateway: Gateway, device: MakeDevice) -> None:
    """aiocoap 0.4.17 sends nothing on cancel and, over OSCORE, went on acknowledging
    notifications for good (gateway/coap/observe_cancel.py); now a later notification
    gets an RST and the gateway drops the observation."""
    alice, bob = await device(ALICE), await device(BOB)
    updates = bob.watch(ALICE)
    await anext(updates)
    assert gateway.presence.observation_count() == 1
    await updates.aclose()

    async def dropped() -> bool:
        await alice.publish(PresenceDocument(Status.OPEN))
        await asyncio.sleep(0.1)
        return gateway.presence.observation_count() == 0

    await eventually(dropped, timeout=5)
    assert await alice.watchers() == []


async def test_a_watcher_of_hundreds_of_presentities_hears_every_change(gateway: Gateway, device: MakeDevice) -> None:
    """RFC 2779 2.2.4: one device observes 300 presentities at once (more than its 255
    one-byte tokens), and every one of their changes reaches it."""
    presentities = [UserId(f"p{i:03d}@example.org") for i in range(300)]
    for user in presentities:
        await gateway.service.register(UserRecord(user))
    carol = await device("carol@example.org")
    latest: dict[UserId, str | None] = {}

    async def watch(presentity: UserId) -> None:
        async for doc in carol.watch(presentity):
            latest[presentity] = doc.note

    watches = [asyncio.create_task(watch(user)) for user in presentities]
    try:
        await eventually(lambda: _true(len(latest) == len(presentities)), timeout=60)
        assert set(latest.values()) == {None}
        assert gateway.presence.observation_count() == len(presentities)
        for user in presentities:
            await gateway.service.publish_presence(user, PresenceDocument(Status.OPEN, note=f"{user} here"), user)
        await eventually(lambda: _true(all(latest[u] == f"{u} here" for u in presentities)), timeout=60)
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)


async def test_hundreds_of_subscribers_to_one_presentity_all_hear_each_change(
    gateway: Gateway, device: MakeDevice, tmp_path: Path
) -> None:
    """RFC 2779 2.2.5: 300 subscribers, each its own principal and OSCORE context (the
    benchmark's lean devices, one UDP socket each), observe one presentity; each of
    three changes reaches every one of them."""
    from benchmarks.throughput import LeanDevice

    alice = await device(ALICE)
    keys = keystore_of(gateway)
    heard: dict[str, list[str | None]] = {}
    watchers: list[LeanDevice] = []
    try:
        for i in range(300):
            user = UserId(f"w{i:03d}@example.org")
            await gateway.service.register(UserRecord(user))
            context = keys.provision(user, tmp_path / "watchers", "coap://unused").context_dir
            watchers.append(await LeanDevice.open(str(context), user, ("127.0.0.1", gateway.port), random.Random(i)))

        def note_of(user: str) -> Callable[[Message], None]:
            return lambda notification: heard[user].append(codec.decode_presence_view(notification.payload).note)

        for lean in watchers:
            heard[lean.user] = []
            first = await lean.request(Message(code=Code.GET, uri_path=("p", ALICE), observe=0), note_of(lean.user))
            assert first.code == Code.CONTENT
        assert gateway.presence.observation_count() == 300
        for note in ("one", "two", "three"):
            await alice.publish(PresenceDocument(Status.OPEN, note=note))
            await eventually(lambda n=note: _true(all(h[-1:] == [n] for h in heard.values())), timeout=30)  # type: ignore[misc]
        assert all(h == ["one", "two", "three"] for h in heard.values())
    finally:
        for lean in watchers:
            lean.close()


async def test_a_vanished_subscriber_is_found_out_of_contact(
    gateway: Gateway, device: MakeDevice, tmp_path: Path
) -> None:
    """RFC 2779 3.2.4, subscriber side: a watcher whose device vanished (its socket gone,
    so the host answers ICMP port unreachable) is found at the next notification and
    leaves the presentity's watcher list; a watcher still there stays on it."""
    alice = await device(ALICE)
    keys = keystore_of(gateway)
    gone = RawDevice(gateway.port, keys.provision(BOB, tmp_path / "gone", "coap://unused").context_dir)
    staying = RawDevice(gateway.port, keys.provision(CAROL, tmp_path / "staying", "coap://unused").context_dir)
    try:
        for watcher in (gone, staying):
            reply = await watcher.exchange(Message(code=Code.GET, observe=0, uri_path=["p", ALICE]), b"\x01")
            assert reply.code == Code.CONTENT
        assert {w.watcher for w in await alice.watchers()} == {BOB, CAROL}
        gone.close()
        await alice.publish(PresenceDocument(Status.OPEN, note="anyone there?"))
        notification = await staying.receive(b"\x01")
        assert codec.decode_presence_view(notification.payload).note == "anyone there?"
        await eventually(lambda: _true(gateway.presence.observation_count() == 1))
        assert [w.watcher for w in await alice.watchers()] == [CAROL]
    finally:
        gone.close()
        staying.close()
