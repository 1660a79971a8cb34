"""Several gateway processes sharing Redis (store and event bus), as real processes.

Two `serve` processes on two ports stand for two machines: a device attached to one
sees presence published through the other, gets IMs sent through the other (once,
even when resent through the other), and no acknowledged IM is lost when one process
is killed with SIGKILL under load. `--workers 2` runs two processes on one port.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiocoap
import pytest

from device_sim.client import DeviceClient, RequestFailed
from gateway.core.model import MessageId, PresenceDocument, Status
from gateway.keys import KeyStore
from gateway.store import open_store

from .conftest import ALICE, BOB, REDIS, eventually, redis_or_skip

REPO = Path(__file__).resolve().parent.parent


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def shared(tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    """(store URL, bus URL, key store) private to this test; Redis keys removed after."""
    await redis_or_skip()
    tag = uuid.uuid4().hex
    store, bus = f"{REDIS}?prefix=impp-test-{tag}:", f"{REDIS}?channel=impp-test-{tag}"
    the_store = await open_store(store)
    from gateway.core.model import UserRecord

    for user in (ALICE, BOB):
        await the_store.add_user(UserRecord(user))
    await the_store.close()
    yield store, bus, tmp_path / "keys"
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS)
    keys = [k async for k in client.scan_iter(match=f"impp-test-{tag}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@asynccontextmanager
async def serve(port: int, store: str, bus: str, keys: Path, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--store",
        store,
        "--bus",
        bus,
        "--keys",
        str(keys),
        *extra,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        if workers == 1:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert b"gateway ready" in line, line
        else:
            # The workers' ready lines have been seen not to reach the pipe (twice in many
            # runs; both workers had logged "serving"): wait for the port to answer instead.
            await _answers(port)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _answers(port: int, timeout: float = 30.0) -> None:
    """Until GET /.well-known/core on the port answers 2.05."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            request = aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{port}/.well-known/core")
            try:
                response = await asyncio.wait_for(context.request(request).response, 2)
                if response.code == aiocoap.CONTENT:
                    return
            except (TimeoutError, aiocoap.error.Error, OSError):
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"nothing answers on udp/{port}")
            await asyncio.sleep(0.2)
    finally:
        await context.shutdown()


async def device(keys: Path, user: str, port: int, tmp_path: Path, timeout: float = 5) -> DeviceClient:
    base = f"coap://127.0.0.1:{port}"
    creds = KeyStore(keys).provision(user, tmp_path / "devices", base)  # type: ignore[arg-type]
    return await DeviceClient.create(base, user, timeout=timeout, credentials=creds.credentials_file)  # type: ignore[arg-type]


async def _true(value: bool) -> bool:
    return value


async def test_two_processes_share_presence_ims_and_exactly_once(shared: tuple[str, str, Path], tmp_path: Path) -> None:
    store, bus, keys = shared
    KeyStore(keys)
    port_a, port_b = free_udp_port(), free_udp_port()
    async with serve(port_a, store, bus, keys), serve(port_b, store, bus, keys):
        alice = await device(keys, ALICE, port_a, tmp_path)  # attached to process A
        bob = await device(keys, BOB, port_b, tmp_path)  # attached to process B
        alice_on_b = await device(keys, ALICE, port_b, tmp_path)
        seen: list[PresenceDocument] = []
        got: list[bytes] = []

        async def watch() -> None:
            async for doc in bob.watch(ALICE):
                seen.append(doc)

        async def inbox() -> None:
            async for batch in bob.watch_inbox():
                got.extend(m.message.payload for m in batch.messages)

        tasks = [asyncio.create_task(watch()), asyncio.create_task(inbox())]
        try:
            await eventually(lambda: _true(len(seen) == 1), timeout=10)
            await alice.publish(PresenceDocument(Status.OPEN, note="published through A"))
            await eventually(lambda: _true(len(seen) == 2), timeout=10)  # notified by B
            assert seen[-1].note == "published through A"
            msg_id = MessageId(b"across-1")
            seq = await alice.send(BOB, "sent through A", msg_id=msg_id)
            assert await alice_on_b.send(BOB, "sent through A", msg_id=msg_id) == seq  # resent through B
            await eventually(lambda: _true(len(got) >= 1), timeout=10)
            await asyncio.sleep(0.5)
            assert got == [b"sent through A"]
            # Store-and-forward across processes: carol is away; nothing else needed.
            await bob.acknowledge(seq)

            async def delivered() -> bool:
                return (await alice.delivery_records())[0].state.name == "DELIVERED"

            await eventually(delivered, timeout=10)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in (alice, bob, alice_on_b):
                await client.close()


async def test_no_acked_message_lost_when_a_process_is_killed(shared: tuple[str, str, Path], tmp_path: Path) -> None:
    store, bus, keys = shared
    port_a, port_b = free_udp_port(), free_udp_port()
    acked: dict[bytes, int] = {}
    async with serve(port_b, store, bus, keys):
        bob = await device(keys, BOB, port_b, tmp_path, timeout=10)
        async with serve(port_a, store, bus, keys) as victim:
            senders = [await device(keys, ALICE, port_a, tmp_path, timeout=2) for _ in range(6)]
            counter = iter(range(10_000))
            stop = asyncio.Event()

            async def load(client: DeviceClient) -> None:
                while not stop.is_set():
                    i = next(counter)
                    msg_id = MessageId(b"k%05d" % i)
                    try:
                        acked[bytes(msg_id)] = await client.send(BOB, f"load {i}", msg_id=msg_id)
                    except (TimeoutError, RequestFailed, aiocoap.error.Error, OSError):
                        await asyncio.sleep(0.05)
                    if len(acked) >= 60 and not stop.is_set():
                        victim.send_signal(signal.SIGKILL)  # mid-stream: other sends are in flight
                        stop.set()

            await asyncio.wait_for(asyncio.gather(*(load(c) for c in senders)), 60)
            assert await asyncio.wait_for(victim.wait(), 10) == -signal.SIGKILL
            for client in senders:
                await client.close()
        # Everything A acknowledged is readable through B, exactly once.
        seen: dict[bytes, int] = {}
        cursor = 0
        while True:
            batch = await bob.fetch_inbox(cursor)
            for queued in batch.messages:
                assert bytes(queued.message.msg_id) not in seen, "delivered twice"
                seen[bytes(queued.message.msg_id)] = queued.seq
            if not batch.more:
                break
            cursor = batch.cursor
        missing = {k: v for k, v in acked.items() if seen.get(k) != v}
        assert len(acked) >= 60 and not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
        await bob.close()


async def test_a_device_context_moves_to_the_process_it_reaches(
    shared: tuple[str, str, Path], tmp_path: Path
) -> None:
    """Two processes on one key directory, as ``--workers`` are. Bob's device reaches
    the second one (as after a NAT rebinding): it takes the context over from the first,
    whose inbox watch ends with a protected 5.03, and answers; the device watches again
    there and gets the next IM. Then back to the first. No unprotected error on the way,
    and nobody is marked out of contact by the process the device left."""
    store, bus, keys = shared
    port_a, port_b = free_udp_port(), free_udp_port()
    async with serve(port_a, store, bus, keys), serve(port_b, store, bus, keys):
        alice = await device(keys, ALICE, port_a, tmp_path)
        bob = await device(keys, BOB, port_a, tmp_path)
        # One device, one context; the same context is used towards the second process.
        creds = bob.context.client_credentials
        creds[f"coap://127.0.0.1:{port_b}/*"] = creds[f"coap://127.0.0.1:{port_a}/*"]
        bob_via_b = DeviceClient(bob.context, f"coap://127.0.0.1:{port_b}", BOB, compact=True)
        try:
            await bob.publish(PresenceDocument(Status.OPEN, note="on A"))
            got: list[bytes] = []

            async def watch(client: DeviceClient) -> None:
                async for batch in client.watch_inbox():
                    got.extend(m.message.payload for m in batch.messages)

            on_a = asyncio.create_task(watch(bob))
            await alice.send(BOB, "one")
            await eventually(lambda: _true(got == [b"one"]))

            await bob_via_b.publish(PresenceDocument(Status.OPEN, note="on B"))
            # A let go: its watch ended (RFC 7641: an error notification ends it).
            await asyncio.wait_for(on_a, 10)
            on_b = asyncio.create_task(watch(bob_via_b))
            await asyncio.sleep(0.5)
            await alice.send(BOB, "two")
            await eventually(lambda: _true(got[-1:] == [b"two"]))
            on_b.cancel()
            await asyncio.gather(on_b, return_exceptions=True)

            # And back: A takes it over again, with the sequence numbers B left.
            assert (await bob.fetch_presence(BOB)).note == "on B"
            await asyncio.sleep(1.5)  # past the gateways' link-loss grace
            assert (await alice.fetch_presence(BOB)).status == Status.OPEN
        finally:
            await alice.close()
            await bob.close()


async def test_workers_share_one_port(shared: tuple[str, str, Path], tmp_path: Path) -> None:
    store, bus, keys = shared
    port = free_udp_port()
    async with serve(port, store, bus, keys, "--workers", "2") as supervisor:
        clients = [await device(keys, ALICE, port, tmp_path) for _ in range(4)]
        try:
            for i, client in enumerate(clients):
                await client.publish(PresenceDocument(Status.OPEN, note=f"device {i}"))
            assert (await clients[0].fetch_presence(ALICE)).note == "device 3"
        finally:
            for client in clients:
                await client.close()
        assert supervisor.returncode is None
    assert supervisor.returncode == 0
