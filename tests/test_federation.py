"""Two gateways, two domains, on loopback: IMs and presence across them, over OSCORE
between the gateways, each domain's rules applied by its own gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiocoap import Code

from device_sim.client import DeviceClient, RequestFailed
from gateway.app import Gateway
from gateway.core.access import AccessRules
from gateway.core.ids import UserId
from gateway.core.model import MessageId, PresenceDocument, Status, UserRecord
from gateway.federation import Federation, Resolver
from gateway.keys import KeyStore

from .conftest import eventually

ALICE = UserId("alice@a.example")
ALEX = UserId("alex@a.example")
BOB = UserId("bob@b.example")
CAROL = UserId("carol@c.example")  # a third domain nobody serves here


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    keys_a: KeyStore
    keys_b: KeyStore
    devices: Path
    made: list[DeviceClient]

    def uri(self, gateway: Gateway) -> str:
        return f"coap://127.0.0.1:{gateway.port}"

    async def device(self, user: UserId, compact: bool = True) -> DeviceClient:
        gateway, keys = (self.a, self.keys_a) if user.endswith("@a.example") else (self.b, self.keys_b)
        creds = keys.provision(user, self.devices, self.uri(gateway))
        client = await DeviceClient.create(
            self.uri(gateway), user, timeout=15, credentials=creds.credentials_file, compact=compact
        )
        self.made.append(client)
        return client


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    keys_a, keys_b = KeyStore(tmp_path / "keys-a"), KeyStore(tmp_path / "keys-b")
    a = await Gateway.start(
        bind=("127.0.0.1", 0), store=f"sqlite:{tmp_path / 'a.db'}", domains=["a.example"], keys=keys_a
    )
    b = await Gateway.start(
        bind=("127.0.0.1", 0), store=f"sqlite:{tmp_path / 'b.db'}", domains=["b.example"], keys=keys_b
    )
    for gateway, users in ((a, (ALICE, ALEX)), (b, (BOB,))):
        for user in users:
            await gateway.service.register(UserRecord(user))
    # Each gateway provisions a context for the other's requests (gateway peer provision).
    a_to_b = keys_b.provision_peer("a.example", tmp_path / "peers-a", f"coap://127.0.0.1:{b.port}")
    b_to_a = keys_a.provision_peer("b.example", tmp_path / "peers-b", f"coap://127.0.0.1:{a.port}")
    await a.enable_federation(
        Federation(Resolver({"b.example": f"coap://127.0.0.1:{b.port}"}), [a_to_b.credentials_file])
    )
    await b.enable_federation(
        Federation(Resolver({"a.example": f"coap://127.0.0.1:{a.port}"}), [b_to_a.credentials_file])
    )
    made: list[DeviceClient] = []
    yield Pair(a, b, keys_a, keys_b, tmp_path / "devices", made)
    for client in made:
        await client.close()
    await a.close()
    await b.close()


async def test_im_across_domains_exactly_once(pair: Pair) -> None:
    alice, bob = await pair.device(ALICE), await pair.device(BOB)
    msg_id = MessageId(b"\x01\x02")
    seq = await alice.send(BOB, "hello from a.example", msg_id=msg_id)
    assert await alice.send(BOB, "hello from a.example", msg_id=msg_id) == seq  # a resend: stored once
    [queued] = (await bob.fetch_inbox()).messages
    assert (queued.seq, queued.message.sender, queued.message.payload) == (seq, ALICE, b"hello from a.example")
    # and back: Bob answers Alice through his own gateway
    await bob.send(ALICE, "hi alice")
    [answer] = (await alice.fetch_inbox()).messages
    assert (answer.message.sender, answer.message.payload) == (BOB, b"hi alice")


async def test_the_recipients_gateway_applies_its_rules(pair: Pair) -> None:
    alice, alex, bob = await pair.device(ALICE), await pair.device(ALEX), await pair.device(BOB)
    await bob.put_rules(AccessRules(senders=("alice@a.example",)))
    await alice.send(BOB, "allowed")
    with pytest.raises(RequestFailed) as refused:
        await alex.send(BOB, "not allowed")
    assert refused.value.code == Code.FORBIDDEN and "refused by bob@b.example" in refused.value.diagnostic
    with pytest.raises(RequestFailed) as unknown:
        await alice.send(UserId("nobody@b.example"), "?")
    assert unknown.value.code == Code.NOT_FOUND
    with pytest.raises(RequestFailed) as unserved:
        await alice.send(CAROL, "no gateway known")
    assert unserved.value.code == Code.SERVICE_UNAVAILABLE
    assert [m.message.payload for m in (await bob.fetch_inbox()).messages] == [b"allowed"]


async def test_presence_across_domains_with_remote_rules(pair: Pair) -> None:
    alice, alex, bob = await pair.device(ALICE), await pair.device(ALEX), await pair.device(BOB)
    await bob.put_rules(AccessRules(fetchers=("alice@a.example",), subscribers=("alice@a.example",)))
    await bob.publish(PresenceDocument(Status.OPEN, note="at b"))
    assert (await alice.fetch_presence(BOB)).note == "at b"
    with pytest.raises(RequestFailed) as refused:
        await alex.fetch_presence(BOB)
    assert refused.value.code == Code.FORBIDDEN
    updates = alice.watch(BOB)
    assert (await asyncio.wait_for(anext(updates), 10)).note == "at b"
    await bob.publish(PresenceDocument(Status.OPEN, note="still at b"))
    assert (await asyncio.wait_for(anext(updates), 10)).note == "still at b"
    # Bob's gateway sees Alice (not her gateway) as the watcher
    assert [w.watcher for w in await bob.watchers()] == [ALICE]
    # Alice stops watching: her gateway drops its local observation when the next
    # notification is refused (RST), and with it the one at Bob's gateway.
    await updates.aclose()

    async def gone() -> bool:
        await bob.publish(PresenceDocument(Status.OPEN, note="anyone there?"))
        await asyncio.sleep(0.2)

        return await bob.watchers() == []

    await eventually(gone, timeout=10)
    assert pair.a.presence.fan_in is not None and not pair.a.presence.fan_in.groups


async def test_a_peer_speaks_only_for_its_own_domain(pair: Pair, tmp_path: Path) -> None:
    """B's gateway is trusted for b.example users only: posing as a.example's Alice at
    A's gateway, or as a user of a domain A serves, is refused."""
    from aiocoap import Context, Message

    bob = await pair.device(BOB)
    await bob.send(ALICE, "fine")  # B -> A on behalf of bob@b.example
    # Now B's peer context, used by hand, claims to speak for Alice of a.example itself.
    creds = pair.keys_a.provision_peer("b.example", tmp_path / "rogue", pair.uri(pair.a))
    context = await Context.create_client_context(transports=["oscore", "udp6"])
    try:
        import json

        context.client_credentials.load_from_dict(json.loads(creds.credentials_file.read_text()))
        request = Message(code=Code.POST, uri=f"{pair.uri(pair.a)}/i/{ALEX}", payload=b"\x82\x41\x09\x41x")
        request.opt.uri_query = [f"f={ALICE}"]
        response = await asyncio.wait_for(context.request(request).response, 10)
        assert response.code == Code.FORBIDDEN and b"only for its own users" in response.payload
        # speaking for nobody: anonymous, which may not send
        anonymous = Message(code=Code.POST, uri=f"{pair.uri(pair.a)}/i/{ALEX}", payload=b"\x82\x41\x09\x41x")
        assert (await asyncio.wait_for(context.request(anonymous).response, 10)).code == Code.UNAUTHORIZED
    finally:
        await context.shutdown()
    alex = await pair.device(ALEX)
    assert (await alex.fetch_inbox()).messages == []


async def test_unreachable_peer_is_503_and_nothing_is_acknowledged(pair: Pair) -> None:
    alice = await pair.device(ALICE)
    await pair.b.close()
    assert pair.a.federation is not None
    pair.a.federation.timeout = 2.0
    with pytest.raises(RequestFailed) as down:
        await alice.send(BOB, "lost?")
    assert down.value.code == Code.SERVICE_UNAVAILABLE
    # the fixture closes b again: make that harmless
    pair.b.close = _noop  # type: ignore[method-assign]


async def _noop() -> None:
    return None


async def test_a_subscriber_watches_presentities_in_200_domains(tmp_path: Path) -> None:
    """RFC 2779 2.2.6: one subscriber, presentities in hundreds of domains, here 200 served
    by one other gateway process under different names, each reached through federation."""
    domains = [f"d{n}.example" for n in range(200)]
    presentities = [UserId(f"p{n}@{d}") for n, d in enumerate(domains)]
    keys_a, keys_b = KeyStore(tmp_path / "keys-a"), KeyStore(tmp_path / "keys-b")
    a = await Gateway.start(
        bind=("127.0.0.1", 0), store=f"sqlite:{tmp_path / 'a.db'}", domains=["a.example"], keys=keys_a
    )
    b = await Gateway.start(bind=("127.0.0.1", 0), store=f"sqlite:{tmp_path / 'b.db'}", domains=domains, keys=keys_b)
    alice: DeviceClient | None = None
    watches = []
    try:
        await a.service.register(UserRecord(ALICE))
        for user in presentities:
            await b.service.register(UserRecord(user))
        to_b = keys_b.provision_peer("a.example", tmp_path / "peers", f"coap://127.0.0.1:{b.port}")
        await a.enable_federation(
            Federation(Resolver({d: f"coap://127.0.0.1:{b.port}" for d in domains}), [to_b.credentials_file])
        )
        uri = f"coap://127.0.0.1:{a.port}"
        creds = keys_a.provision(ALICE, tmp_path / "devices", uri)
        alice = await DeviceClient.create(uri, ALICE, timeout=20, credentials=creds.credentials_file)
        watches = [alice.watch(p) for p in presentities]
        # One device sends at most 16 at once: its gateway's OSCORE replay window is 32.
        slots = asyncio.Semaphore(16)

        async def registered(watch: AsyncIterator[PresenceDocument]) -> PresenceDocument:
            async with slots:
                return await asyncio.wait_for(anext(watch), 30)

        firsts = await asyncio.gather(*(registered(w) for w in watches))
        assert {doc.status for doc in firsts} == {Status.CLOSED}
        assert a.presence.fan_in is not None and len(a.presence.fan_in.groups) == 200
        assert b.presence.observation_count() == 200
        for n, user in enumerate(presentities):
            await b.service.publish_presence(user, PresenceDocument(Status.OPEN, note=f"in d{n}"), user)
        seconds = await asyncio.gather(*(asyncio.wait_for(anext(w), 30) for w in watches))
        assert [doc.note for doc in seconds] == [f"in d{n}" for n in range(200)]
    finally:
        for watch in watches:
            await watch.aclose()
        if alice is not None:
            await alice.close()
        await a.close()
        await b.close()


async def test_local_watchers_share_one_observation_at_the_peer(pair: Pair) -> None:
    """Fan-in: Alice and Amy (a.example) watch Bob (b.example) through one observation at
    Bob's gateway, which still decides for each: Amy sees another view, Alex is refused,
    and Bob can cancel Alice alone."""
    from gateway.core.access import Field, View

    amy = UserId("amy@a.example")
    await pair.a.service.register(UserRecord(amy))
    alice, alex, amy_device, bob = (
        await pair.device(ALICE), await pair.device(ALEX), await pair.device(amy), await pair.device(BOB)
    )
    await bob.put_rules(
        AccessRules(
            subscribers=("alice@a.example", "amy@a.example"),
            views={"amy@a.example": View(Field(0), note="busy")},
        )
    )
    await bob.publish(PresenceDocument(Status.OPEN, note="in the lab"))
    alice_updates, amy_updates = alice.watch(BOB), amy_device.watch(BOB)
    assert (await asyncio.wait_for(anext(alice_updates), 10)).note == "in the lab"
    assert (await asyncio.wait_for(anext(amy_updates), 10)).note == "busy"
    with pytest.raises(RequestFailed) as refused:
        await anext(alex.watch(BOB))
    assert refused.value.code == Code.FORBIDDEN
    assert pair.b.presence.observation_count() == 1  # one observation at Bob's gateway for both
    assert sorted(w.watcher for w in await bob.watchers()) == [ALICE, amy]

    await bob.publish(PresenceDocument(Status.OPEN, note="back at my desk"))
    assert (await asyncio.wait_for(anext(alice_updates), 10)).note == "back at my desk"
    amy_doc = await asyncio.wait_for(anext(amy_updates), 10)
    assert (amy_doc.status, amy_doc.note) == (Status.OPEN, "busy")

    await bob.cancel_watcher(ALICE)
    assert [w.watcher for w in await bob.watchers()] == [amy]
    await bob.publish(PresenceDocument(Status.CLOSED, note="gone home"))
    assert (await asyncio.wait_for(anext(amy_updates), 10)).status is Status.CLOSED
    # Alice's watch ended with the cancellation (device_sim's watch skips error
    # notifications, so look at her subscriptions at her own gateway)
    await eventually(lambda: _no_subscription(alice), timeout=10)
    await alice_updates.aclose()
    await amy_updates.aclose()


async def _no_subscription(client: DeviceClient) -> bool:
    return [s for s in await client.subscriptions() if s.state.name == "ACTIVE"] == []
