"""Short paths, contacts, the compact IM form, counter message ids and 1-byte tokens:
what a device on a narrow link saves in every request (docs/protocol.md 1.2)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiocoap import Code, Message

from benchmarks.peers.meter import Meter, UdpRelay
from device_sim.client import DeviceClient, MessageIdCounter, RequestFailed
from gateway.app import Gateway
from gateway.core import codec
from gateway.core.errors import BadRequest, CodecError
from gateway.core.ids import UserId, parse_address
from gateway.core.model import InstantMessage, MessageId, PresenceDocument, Status

from .conftest import ALICE, BOB, CAROL, keystore_of

MakeDevice = Callable[..., Awaitable[DeviceClient]]


# -- the pure parts ------------------------------------------------------------------------


def test_path_segments_parse_to_addresses() -> None:
    assert parse_address([]).__repr__() == "Address(user=None, local=None, alias=None)"
    assert parse_address(["bob@Example.org"]).user == "bob@example.org"
    assert parse_address(["bob"]).local == "bob"
    assert parse_address(["3"]).alias == 3 and parse_address(["255"]).alias == 255
    assert parse_address(["03"]).local == "03"  # no leading zeros in a contact number
    assert parse_address(["1000"]).local == "1000"  # contact numbers have three digits at most
    for bad in (["bad!id"], ["a", "b"], [""], ["x@bad_domain"]):
        with pytest.raises(BadRequest):
            parse_address(bad)


def test_compact_message_form_round_trips_and_is_two_bytes_smaller() -> None:
    msg = InstantMessage(MessageId(b"\x03\xe8"), ALICE, BOB, b"Hello Bob, all good?")
    compact = codec.encode_message(msg, include_from=False, compact=True)
    full = codec.encode_message(msg, include_from=False)
    assert compact[0] == 0x82 and len(full) - len(compact) == 2  # the two keys
    assert codec.decode_message(compact, BOB, ALICE) == codec.decode_message(full, BOB, ALICE)
    # anything beyond id and payload keeps the map form
    with_ttl = InstantMessage(MessageId(b"\x01"), ALICE, BOB, b"x", ttl=60)
    assert codec.encode_message(with_ttl, include_from=False, compact=True)[0] & 0xE0 == 0xA0
    for bad in ([b"\x01"], [b"\x01", b"x", 0], [1, b"x"], [b"\x01", "text"]):
        with pytest.raises(CodecError):
            codec.decode_message(codec._dumps(bad), BOB, ALICE)


def test_counter_message_ids_are_short_and_never_repeat(tmp_path: Path) -> None:
    counter = MessageIdCounter(start=255)
    assert [len(counter()) for _ in range(2)] == [1, 2]
    assert len(MessageIdCounter(start=65_536)()) == 3
    state = tmp_path / "msgid"
    first = MessageIdCounter(state)
    taken = [first() for _ in range(70)]  # crosses a reserved block
    # a crash: the next run starts past everything reserved, and repeats nothing
    again = MessageIdCounter(state)
    later = [again() for _ in range(5)]
    assert not set(taken) & set(later)
    assert int.from_bytes(later[0], "big") >= int.from_bytes(taken[-1], "big")
    assert len(set(taken)) == 70


def test_a_user_named_like_a_contact_number_is_written_in_full() -> None:
    client = DeviceClient(None, "coap://unused", ALICE, compact=True)  # type: ignore[arg-type]
    assert client.at() == "" and client.at(BOB) == "/bob"
    assert client.at(UserId("42@example.org")) == "/42@example.org"
    assert client.at(UserId("bob@elsewhere.net")) == "/bob@elsewhere.net"
    client.aliases = {BOB: 1}
    assert client.at(BOB) == "/1"
    assert DeviceClient(None, "coap://unused", ALICE).at(BOB) == f"/{BOB}"  # type: ignore[arg-type]


# -- over CoAP and OSCORE --------------------------------------------------------------------


async def test_own_resources_and_same_domain_users_by_short_path(device: MakeDevice, anonymous: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    assert alice.compact and alice.at() == ""
    await alice.publish(PresenceDocument(Status.OPEN, note="short"))  # PUT /p
    assert (await bob.fetch_presence(ALICE)).note == "short"  # GET /p/alice
    assert (await bob.request(Code.GET, f"/p/{ALICE}")).code == Code.CONTENT  # the full form still works
    seq = await bob.send(ALICE, "hi")  # POST /i/alice
    batch = await alice.fetch_inbox()  # GET /i
    assert [(m.seq, m.message.sender, m.message.payload) for m in batch.messages] == [(seq, BOB, b"hi")]
    await alice.acknowledge(seq)  # DELETE /i?c=
    assert (await alice.fetch_inbox()).messages == []
    stranger = await anonymous()
    for path in ("/p", "/i", "/c", "/p/3"):
        response = await stranger.request(Code.GET, path)
        assert response.code == Code.UNAUTHORIZED, path


async def test_contacts_name_recipients_by_number(device: MakeDevice, anonymous: MakeDevice) -> None:
    alice, bob, carol = await device(ALICE), await device(BOB), await device(CAROL)
    assert await alice.contacts() == ()
    await alice.set_contacts([BOB, CAROL])
    assert await alice.contacts() == (BOB, CAROL)
    assert alice.at(CAROL) == "/2"
    seq = await alice.send(CAROL, "via contact 2")  # POST /i/2
    [queued] = (await carol.fetch_inbox()).messages
    assert (queued.seq, queued.message.sender, queued.message.payload) == (seq, ALICE, b"via contact 2")
    assert (await alice.fetch_presence(BOB)).status is Status.CLOSED  # GET /p/1
    # a number means the requester's own contacts: Bob's contact 2 is nobody
    response = await bob.request(Code.POST, "/i/2", codec.encode_message(queued.message, include_from=False))
    assert response.code == Code.NOT_FOUND and b"no contact 2" in response.payload
    # contacts are private to their principal
    assert (await bob.request(Code.GET, f"/c/{ALICE}")).code == Code.FORBIDDEN
    assert (await bob.request(Code.PUT, f"/c/{ALICE}", codec.encode_contacts([BOB]))).code == Code.FORBIDDEN
    assert (await (await anonymous()).request(Code.GET, f"/c/{ALICE}")).code == Code.UNAUTHORIZED
    for bad in (b"\xff", codec._dumps(["not an id"]), codec._dumps(["a@b.co"] * 256), codec._dumps({0: BOB})):
        assert (await alice.request(Code.PUT, "/c", bad)).code == Code.BAD_REQUEST
    assert await alice.contacts() == (BOB, CAROL)


async def test_compact_devices_use_one_byte_tokens_and_skip_those_in_use(gateway: Gateway, tmp_path: Path) -> None:
    """Every request of a compact OSCORE device carries a 1-byte token, and a token held by
    a running observation is not handed out again even after 255 other requests."""
    meter = Meter()
    relay = await UdpRelay(meter, "bob", ("127.0.0.1", gateway.port)).start()
    uri = "coap://{}:{}".format(*relay.address)
    keys = keystore_of(gateway)
    bob = await DeviceClient.create(
        uri, BOB, timeout=10, credentials=keys.provision(BOB, tmp_path / "bob", uri).credentials_file
    )
    direct = f"coap://127.0.0.1:{gateway.port}"
    alice = await DeviceClient.create(
        direct, ALICE, timeout=10, credentials=keys.provision(ALICE, tmp_path / "alice", direct).credentials_file
    )
    try:
        batches = bob.watch_inbox()
        assert (await anext(batches)).messages == []
        [registration] = [r for r in meter.records if r.direction == "up"]
        observation_token = Message.decode(registration.data).token
        for _ in range(300):
            await bob.fetch_inbox()
        await alice.send(BOB, "still observed")
        batch = await asyncio.wait_for(anext(batches), 10)
        assert [m.message.payload for m in batch.messages] == [b"still observed"]
        requests = [Message.decode(r.data) for r in meter.records if r.direction == "up"]
        requests = [m for m in requests if m.code.is_request()]
        assert len(requests) >= 301 and {len(m.token) for m in requests} == {1}
        assert sum(m.token == observation_token for m in requests) == 1
        await batches.aclose()
    finally:
        await bob.close()
        await alice.close()
        relay.close()


async def test_non_compact_devices_keep_full_paths(gateway: Gateway, tmp_path: Path) -> None:
    uri = f"coap://127.0.0.1:{gateway.port}"
    creds = keystore_of(gateway).provision(ALICE, tmp_path, uri)
    alice = await DeviceClient.create(uri, ALICE, timeout=10, credentials=creds.credentials_file, compact=False)
    try:
        assert alice.at() == f"/{ALICE}"
        await alice.publish(PresenceDocument(Status.OPEN))
        with pytest.raises(RequestFailed) as refused:
            await alice.send(UserId("nobody@example.org"), "x")
        assert refused.value.code == Code.NOT_FOUND
    finally:
        await alice.close()


def test_terse_batches_and_contact_numbers_round_trip() -> None:
    from gateway.core.model import QueuedMessage, Seq

    plain = InstantMessage(MessageId(b"\x03\xe8"), BOB, ALICE, b"See you at 10:30 ok?")
    with_ttl = InstantMessage(MessageId(b"\x03\xe9"), CAROL, ALICE, b"later", ttl=60)
    batch = [QueuedMessage(Seq(7), plain, 0), QueuedMessage(Seq(9), with_ttl, 0)]
    terse = codec.encode_batch(batch, False, {BOB: 1})
    explicit = codec.encode_batch(batch, False, terse=False)
    assert codec._loads(terse)[0] == [7, b"\x03\xe8", 1, b"See you at 10:30 ok?"]  # sender as contact 1
    assert len(terse) < len(explicit) - len(BOB)
    assert codec.decode_batch(terse, ALICE, (BOB,)) == codec.decode_batch(explicit, ALICE) == (
        [QueuedMessage(Seq(7), plain, 0), QueuedMessage(Seq(9), with_ttl, 0)],
        9,
        False,
    )
    with pytest.raises(CodecError, match="contact 1 unknown"):
        codec.decode_batch(terse, ALICE, ())
    more = codec.encode_batch(batch[:1], True)
    assert codec.decode_batch(more, ALICE)[1:] == (7, True)
    assert codec.decode_batch(codec.encode_batch([], False), ALICE) == ([], 0, False)


async def test_bodies_name_contacts_by_number_when_asked(device: MakeDevice) -> None:
    alice, bob = await device(ALICE), await device(BOB)
    await bob.set_contacts([CAROL, ALICE])
    await alice.set_contacts([BOB])
    seq = await bob.send(ALICE, "numbered")
    raw = await alice.request(Code.GET, "/i?a")
    assert codec._loads(raw.payload) == [[seq, codec._loads(raw.payload)[0][1], 1, b"numbered"]]
    [queued] = (await alice.fetch_inbox()).messages
    assert queued.message.sender == BOB
    await alice.acknowledge(seq)
    records = await bob.request(Code.GET, "/o?a")
    assert codec._loads(records.payload)[0][1] == 2  # Alice is Bob's contact 2
    [record] = await bob.delivery_records()
    assert record.recipient == ALICE
    # without ?a, names in full
    assert codec._loads((await bob.request(Code.GET, "/o")).payload)[0][1] == ALICE


async def test_only_news_is_notified(device: MakeDevice) -> None:
    """The sender's records are notified when a message is delivered or fails, not when
    it is queued (the 2.01 said so); an inbox is notified of new messages, not of its
    owner's acknowledgements."""
    alice, bob = await device(ALICE), await device(BOB)
    records: asyncio.Queue[Message] = asyncio.Queue()
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    observations = []
    for client, path, queue in ((bob, "/o", records), (alice, "/i", inbox)):
        request = client.context.request(Message(code=Code.GET, uri=client.base + path, observe=0))
        assert (await asyncio.wait_for(request.response, 5)).code == Code.CONTENT
        observations.append(request)

        async def pump(request: object = request, queue: asyncio.Queue[Message] = queue) -> None:
            async for notification in request.observation:  # type: ignore[attr-defined]
                await queue.put(notification)

        asyncio.get_running_loop().create_task(pump())
    seq = await bob.send(ALICE, "news")
    await asyncio.wait_for(inbox.get(), 5)
    await asyncio.sleep(0.3)
    assert records.empty()
    await alice.acknowledge(seq)
    delivered = codec.decode_records((await asyncio.wait_for(records.get(), 5)).payload)
    assert delivered[0].state.name == "DELIVERED"
    await asyncio.sleep(0.3)
    assert inbox.empty()
    for request in observations:
        request.observation.cancel()
