"""Our gateway, in process, with two real devices (device_sim's DeviceClient) behind
one counting UDP relay each.

``oscore``: the gateway as deployed (``serve`` with ``--keys``): each device has its own
pairwise OSCORE context, provisioned with ``KeyStore.provision`` for the relay's URI.

``plain``: the same devices and the same requests without OSCORE. A gateway without
OSCORE treats every request as anonymous, and anonymous may neither publish nor send
nor read an inbox (no access rule can allow it: docs/protocol.md 1.1). So for this
variant only, the benchmark starts the gateway without keys and replaces
``gateway.coap.resources.requester_of`` with a shim that names the principal by the
UDP source port of its relay (one relay per device), as if the link authenticated
it. Everything else (resources, codec, bodies, options) is the unchanged gateway, so
plain vs OSCORE is exactly what OSCORE adds. It is a measurement rig, not a way to
deploy the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import Code, Message

import gateway.coap.resources as resources_module
from device_sim.client import DeviceClient, ShortTokens
from gateway.app import Gateway
from gateway.core import codec
from gateway.core.ids import UserId
from gateway.core.model import DeliveryState, MessageId, PresenceDocument, Status, UserRecord
from gateway.dictionaries import load_registry
from gateway.keys import KeyStore

from . import SystemRun, content, next_matching
from .meter import Meter, UdpRelay

TIMEOUT = 10.0


def describe(data: bytes) -> str:
    """'CON POST' / 'ACK 2.04' / 'ACK EMPTY' for one CoAP datagram (outer header)."""
    try:
        msg = Message.decode(data)
    except Exception:
        return "?"
    kind = {0: "CON", 1: "NON", 2: "ACK", 3: "RST"}[int(msg.mtype)]
    if msg.code == aiocoap.EMPTY:
        code = "EMPTY"
    else:
        code = str(msg.code.name_printable) if msg.code.is_request() else str(msg.code.dotted)
    extra = " OSCORE" if msg.opt.oscore is not None else ""
    return f"{kind} {code}{extra}"


async def _pump(iterator: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        async for item in iterator:
            await queue.put(item)


async def _wait_for(queue: asyncio.Queue[Any], check: Any) -> Any:
    return await next_matching(queue, check, TIMEOUT)


async def _observe_records(device: DeviceClient, queue: asyncio.Queue[Any]) -> asyncio.Task[None]:
    """Bob observes his delivery records (/o): the way a sender learns of delivery."""
    flag = "?a" if device.aliases else ""  # recipients named by Bob's contact numbers
    uri = f"{device.base}/o{device.at()}{flag}"
    request = device.context.request(device.message(code=Code.GET, uri=uri, observe=0))
    first = await asyncio.wait_for(request.response, TIMEOUT)
    if not first.code.is_successful():
        raise RuntimeError(f"/o observe failed: {first.code}")

    async def records() -> AsyncIterator[Any]:
        try:
            async for notification in request.observation:
                if notification.code.is_successful():
                    yield codec.decode_records(notification.payload, device.contact_list)
        finally:
            if not request.observation.cancelled:  # an error notification already ended it
                request.observation.cancel()

    return asyncio.create_task(_pump(records(), queue))


def _release_contexts(device: DeviceClient) -> None:
    """Persist and unlock the device's OSCORE contexts now, while their directory
    exists (aiocoap would otherwise do it on garbage collection, after cleanup)."""
    for credential in list(device.context.client_credentials.values()):
        if getattr(credential, "lockfile", None) is not None:
            credential._destroy()


async def run(variant: str, workdir: Path) -> SystemRun:
    if variant not in ("plain", "oscore", "oscore-zstd"):
        raise ValueError(variant)
    for name in ("coap", "aiocoap", "gateway"):
        logging.getLogger(name).setLevel(logging.ERROR)
    meter = Meter()
    workdir.mkdir(parents=True, exist_ok=True)
    keys = KeyStore(workdir / "keys") if variant != "plain" else None
    gw = await Gateway.start(
        bind=("127.0.0.1", 0), store=f"sqlite:{workdir / 'gateway.db'}", domains=[content.DOMAIN], keys=keys
    )
    alice_id, bob_id = UserId(content.ALICE), UserId(content.BOB)
    for user in (alice_id, bob_id):
        await gw.service.register(UserRecord(user))
    relays = {leg: await UdpRelay(meter, leg, ("127.0.0.1", gw.port)).start() for leg in ("alice", "bob")}
    original_requester_of = resources_module.requester_of
    tasks: list[asyncio.Task[None]] = []
    devices: list[DeviceClient] = []
    try:
        clients: dict[str, DeviceClient] = {}
        for leg, user in (("alice", alice_id), ("bob", bob_id)):
            uri = "coap://{}:{}".format(*relays[leg].address)
            if keys is not None:
                creds = keys.provision(user, workdir / "devices", uri)
                clients[leg] = await DeviceClient.create(
                    uri, user, timeout=TIMEOUT, credentials=creds.credentials_file, compact=True
                )
            else:
                clients[leg] = await DeviceClient.create(uri, user, timeout=TIMEOUT, compact=True)
                ShortTokens.install(clients[leg].context)  # as with OSCORE, so that only OSCORE differs
            if variant == "oscore-zstd":
                clients[leg].enable_compression(load_registry())
            devices.append(clients[leg])
        if keys is None:
            by_port = {relays["alice"].upstream_port: alice_id, relays["bob"].upstream_port: bob_id}

            def requester_of(request: Message) -> UserId | None:
                found = original_requester_of(request)
                if found is None and request.remote is not None:
                    return by_port.get(request.remote.sockaddr[1])
                return found

            resources_module.requester_of = requester_of
        alice, bob = clients["alice"], clients["bob"]
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        records: asyncio.Queue[Any] = asyncio.Queue()
        presence: asyncio.Queue[Any] = asyncio.Queue()

        meter.phase = "setup"
        # Each names the other by contact number 1: in paths (/p/1, /i/1) and, asked
        # with ?a, in inbox batches and delivery records.
        await bob.set_contacts([alice_id])
        await alice.set_contacts([bob_id])
        tasks.append(asyncio.create_task(_pump(alice.watch_inbox(), inbox)))
        await _wait_for(inbox, lambda batch: True)  # the first (empty) batch
        tasks.append(await _observe_records(bob, records))
        await alice.publish(PresenceDocument(status=Status.OPEN))
        await meter.settle()

        meter.phase = "subscribe"
        tasks.append(asyncio.create_task(_pump(bob.watch(alice_id), presence)))
        await _wait_for(presence, lambda doc: doc.status == Status.OPEN)
        await meter.settle()

        meter.phase = "publish"
        await alice.publish(PresenceDocument(status=Status.OPEN, note=content.NOTE))
        await _wait_for(presence, lambda doc: doc.note == content.NOTE)
        await meter.settle()

        meter.phase = "im20"
        seq = await bob.send(alice_id, content.IM20, msg_id=MessageId(content.IM20_ID))
        await _wait_for(inbox, lambda batch: any(m.message.payload == content.IM20.encode() for m in batch.messages))
        await meter.settle()

        meter.phase = "ack"
        await alice.acknowledge(seq)
        await _wait_for(
            records,
            lambda recs: any(r.msg_id == content.IM20_ID and r.state == DeliveryState.DELIVERED for r in recs),
        )
        await meter.settle()

        meter.phase = "im140"
        await bob.send(alice_id, content.IM140, msg_id=MessageId(content.IM140_ID))
        await _wait_for(inbox, lambda batch: any(m.message.payload == content.IM140.encode() for m in batch.messages))
        await meter.settle()
        meter.phase = "teardown"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for device in devices:
            await device.close()
            _release_contexts(device)
        for relay in relays.values():
            relay.close()
        await gw.close()
        resources_module.requester_of = original_requester_of
    how = (
        "UDP payload of every datagram (CoAP message) through one counting UDP relay per device on 127.0.0.1; "
        "gateway in process, devices = device_sim.client.DeviceClient (aiocoap 0.4.17, CON requests, "
        "piggybacked responses, CON notifications + empty ACKs), compact as deployed: 1-byte tokens, short paths "
        "(/p, /i for the own resources; each names the other by contact number 1, also in bodies), IMs as [id, payload]"
    )
    run_ = SystemRun(f"coap-{variant}", meter, "udp", how)
    if variant == "oscore-zstd":
        run_.notes.append(
            "bodies compressed with the trained zstd dictionaries (gateway/dictionaries) when smaller; every request "
            "carries Accept (3 B) and a compressed body Content-Format (3 B)"
        )
    if variant == "plain":
        run_.notes.append(
            "plain = same requests without OSCORE; the gateway ran without keys and a benchmark-only shim named the "
            "requester by its relay's source port (anonymous may not publish/send/read an inbox under any rule)"
        )
    run_.notes.append(
        "Bob observes /o (delivery records) to learn of delivery: its QUEUED notification is booked to the IM, "
        "its DELIVERED notification to the ack; Alice's inbox is re-notified (empty batch) after her ack"
    )
    return run_
