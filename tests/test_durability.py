"""Durability: what the gateway acknowledged survives SIGKILL (SQLite WAL, synchronous=FULL,
commit before 2.01), and a sender's retries after the crash still land exactly once.

Every device is an OSCORE principal provisioned with the CLI before the gateway starts.
A crash loses the gateway's replay windows (aiocoap persists them only on a clean
shutdown), so after the restart each device's first request goes through the Echo
recovery of RFC 8613 B.1.2: the devices keep their security contexts and keep working,
and a request captured before the crash cannot be replayed after it."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import pytest
from aiocoap import Code, Message

from device_sim.client import DeviceClient, RequestFailed
from gateway.core import codec
from gateway.core.ids import UserId
from gateway.core.model import Contact, MessageId, PresenceDocument, QueuedMessage, Status

from .conftest import ALICE, BOB
from .rawcoap import RawDevice

REPO = Path(__file__).resolve().parent.parent
TOTAL = 200
KILL_AFTER = 100  # acknowledged messages before the SIGKILL
SENDERS = 8  # concurrent senders, each its own client context and OSCORE context (NSTART is 1 per peer)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def gateway_cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@dataclass(frozen=True)
class Provisioned:
    user: UserId
    kid: str  # hex
    context_dir: Path
    credentials: Path


async def provision(user: UserId, store: str, keys: Path, devices: Path, base: str) -> Provisioned:
    """`python -m gateway provision`, as an operator runs it (one at a time: it picks a free key id)."""
    out = await gateway_cli(
        "provision", user, "--store", store, "--keys", str(keys), "--out", str(devices), "--gateway", base
    )
    kid = out.splitlines()[0].rpartition("key id ")[2]
    device = Provisioned(user, kid, devices / f"{user}-{kid}", devices / f"{user}-{kid}.json")
    assert device.credentials.is_file() and device.context_dir.is_dir(), out
    return device


@asynccontextmanager
async def gateway_process(port: int, store: str, keys: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            "--keys", str(keys), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"gateway ready" in line, f"{line!r}; stderr: {log.read_text()}"
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def replay_window(keys: Path, kid: str) -> object:
    """What the gateway persisted of a context's replay window ("unknown": not persisted)."""
    return json.loads((keys / kid / "sequence.json").read_text())["received"]


def with_mid(datagram: bytes, mid: int) -> bytes:
    """The same datagram under another message id: what an attacker replaying it would send
    (a new id gets past CoAP's duplicate detection; only OSCORE can refuse it)."""
    return datagram[:2] + mid.to_bytes(2, "big") + datagram[4:]


def message_id(i: int) -> MessageId:
    return MessageId(b"m%03d" % i)


def text_of(i: int) -> str:
    return f"message {i} ✓"


async def read_whole_inbox(client: DeviceClient) -> list[QueuedMessage]:
    """Page through the inbox with the cursor until the gateway says there is no more."""
    messages: list[QueuedMessage] = []
    cursor = 0
    while True:
        batch = await client.fetch_inbox(cursor)
        messages += batch.messages
        if not batch.more:
            return messages
        assert batch.messages and batch.cursor > cursor, "'more' without progress"
        cursor = batch.cursor


@pytest.mark.slow
async def test_acked_messages_survive_sigkill(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'gw.db'}"
    keys, devices = tmp_path / "keys", tmp_path / "devices"
    log = tmp_path / "gateway.stderr"
    await gateway_cli("user", "add", "--store", store, ALICE, BOB)
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"
    # Provisioned before the gateway starts: SENDERS devices of alice, one of bob, and a
    # raw device of alice (a bare socket) that watches the OSCORE exchanges byte by byte.
    sender_creds = [await provision(ALICE, store, keys, devices, base) for _ in range(SENDERS)]
    bob_creds = await provision(BOB, store, keys, devices, base)
    probe_creds = await provision(ALICE, store, keys, devices, base)
    assert len({d.kid for d in [*sender_creds, bob_creds, probe_creds]}) == SENDERS + 2

    acked: dict[MessageId, int] = {}  # msg id -> seq the gateway answered with 2.01
    acked_by: list[int] = [0] * SENDERS
    unanswered: set[MessageId] = set()  # in flight when the gateway died: state unknown
    refused: list[str] = []
    pending = list(range(TOTAL))
    killed = asyncio.Event()
    published = PresenceDocument(Status.OPEN, note="before the crash", contact=Contact(tel="+49 30 1"), lease=86400)

    # The devices live through the crash: the same clients (and contexts) are used after it.
    senders = [await DeviceClient.create(base, ALICE, timeout=3, credentials=c.credentials) for c in sender_creds]
    bob = await DeviceClient.create(base, BOB, timeout=10, credentials=bob_creds.credentials)
    probe = RawDevice(port, probe_creds.context_dir)
    try:
        async with gateway_process(port, store, keys, log) as first:
            # The probe publishes; the datagram is kept to be replayed after the crash.
            publish = Message(
                code=Code.PUT, uri_path=["p", ALICE], payload=codec.encode_presence(published, for_publish=True),
                content_format=60,
            )
            captured_publish = probe.datagram(publish, b"\x01")
            await probe.send_raw(captured_publish)
            assert (await probe.receive(b"\x01")).code == Code.CHANGED
            presence_before = await bob.fetch_presence(ALICE)
            assert (presence_before.note, presence_before.version) == ("before the crash", 1)

            async def sender(index: int) -> None:
                client = senders[index]
                while pending and not killed.is_set():
                    i = pending.pop(0)
                    try:
                        acked[message_id(i)] = await client.send(BOB, text_of(i), msg_id=message_id(i))
                    except RequestFailed as exc:
                        refused.append(f"{message_id(i)!r}: {exc}")
                        continue
                    except (TimeoutError, aiocoap.error.Error, OSError):
                        unanswered.add(message_id(i))
                        continue
                    acked_by[index] += 1
                    if len(acked) >= KILL_AFTER and not killed.is_set():
                        first.send_signal(signal.SIGKILL)  # while the other senders' requests are in flight
                        killed.set()

            await asyncio.wait_for(asyncio.gather(*(sender(n) for n in range(SENDERS))), 60)
            assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL

        assert not refused, f"the gateway refused messages: {refused}"
        assert KILL_AFTER <= len(acked) < TOTAL
        assert unanswered, "no request was in flight at the kill: the test did not kill mid-stream"
        never_sent = [message_id(i) for i in pending]
        # The crash left no replay window on disk for any context that had been used:
        # after the restart the gateway must recover them (Echo), not start them empty.
        used = [bob_creds, probe_creds, *(c for c, n in zip(sender_creds, acked_by, strict=True) if n)]
        assert len(used) >= 3
        assert {d.kid: replay_window(keys, d.kid) for d in used} == {d.kid: "unknown" for d in used}

        async with gateway_process(port, store, keys, log) as second:  # same store, same keys, same port
            # Replaying the publish captured before the crash: the gateway cannot know it is
            # old, so it asks for freshness (a protected 4.01 with Echo) instead of serving it.
            await probe.send_raw(with_mid(captured_publish, 1001))
            challenge = await probe.receive(b"\x01")
            assert challenge.code == Code.UNAUTHORIZED and challenge.opt.echo, challenge
            # The probe's fresh request is challenged too; repeating the Echo value proves freshness.
            fresh = await probe.exchange(Message(code=Code.GET, uri_path=["p", ALICE]), b"\x02")
            assert fresh.code == Code.UNAUTHORIZED and fresh.opt.echo
            answered = await probe.exchange(Message(code=Code.GET, uri_path=["p", ALICE], echo=fresh.opt.echo), b"\x03")
            assert answered.code == Code.CONTENT and codec.decode_presence_view(answered.payload) == presence_before
            # Now the window is known again: the old publish is a replay and is refused outright.
            await probe.send_raw(with_mid(captured_publish, 1002))
            replayed = await probe.receive(b"\x01")
            assert (replayed.code, replayed.opt.echo, replayed.payload) == (Code.UNAUTHORIZED, None, b"Replay detected")

            # The other devices recover through aiocoap's own Echo handling, unnoticed.
            inbox = await read_whole_inbox(bob)
            ids = [q.message.msg_id for q in inbox]
            assert len(ids) == len(set(ids)), "a message is in the inbox twice"
            by_id = {q.message.msg_id: q for q in inbox}
            # Every acknowledged message is there, once, under the seq it was acknowledged with.
            missing = sorted(set(acked) - set(by_id))
            assert not missing, f"{len(missing)} acknowledged message(s) lost: {missing[:10]}"
            for msg_id, seq in acked.items():
                queued = by_id[msg_id]
                assert (queued.seq, queued.message.sender, queued.message.payload) == (
                    seq, ALICE, text_of(int(msg_id[1:])).encode()
                )
            # Nothing else: only messages that were in flight may have been stored unacknowledged.
            assert set(by_id) <= set(acked) | unanswered
            assert [q.seq for q in inbox] == sorted(q.seq for q in inbox)
            # The presence published before the crash is intact, and no replay republished it.
            assert await bob.fetch_presence(ALICE) == presence_before

            # The senders retry what they never saw acknowledged, and send the rest, each on
            # the context it had before the crash: every message ends up in the inbox exactly once.
            for n, msg_id in enumerate(sorted(unanswered) + never_sent):
                seq = await senders[n % SENDERS].send(BOB, text_of(int(msg_id[1:])), msg_id=msg_id)
                if msg_id in by_id:
                    assert seq == by_id[msg_id].seq, "a retry of a stored message got a new seq"
            final = await read_whole_inbox(bob)
            assert sorted(q.message.msg_id for q in final) == [message_id(i) for i in range(TOTAL)]
            assert {q.message.sender for q in final} == {ALICE}
            # Every sender context works after the crash (not only those with a share of the retries).
            for client in senders:
                assert (await client.fetch_presence(ALICE)).version == 1
        assert second.returncode == 0
        # A clean stop persists the replay windows again: the next start needs no recovery.
        for device in [*sender_creds, bob_creds, probe_creds]:
            window = replay_window(keys, device.kid)
            assert isinstance(window, dict) and "index" in window, (device.kid, window)
    finally:
        probe.close()
        for client in [*senders, bob]:
            await client.close()
    assert "Traceback" not in log.read_text(), log.read_text()
