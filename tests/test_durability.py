"""Durability: what the gateway acknowledged survives SIGKILL (SQLite WAL, synchronous=FULL,
commit before 2.01), and a sender's retries after the crash still land exactly once."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiocoap
import pytest

from device_sim.client import DeviceClient, RequestFailed
from gateway.core.model import Contact, MessageId, PresenceDocument, QueuedMessage, Status

from .conftest import ALICE, BOB

REPO = Path(__file__).resolve().parent.parent
TOTAL = 200
KILL_AFTER = 100  # acknowledged messages before the SIGKILL
SENDERS = 8  # concurrent senders, each its own client context (aiocoap's NSTART is 1 per peer)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def gateway_process(port: int, store: str, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
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
    log = tmp_path / "gateway.stderr"
    add = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "user", "add", "--store", store, ALICE, BOB, cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await add.wait() == 0
    port = free_udp_port()
    base = f"coap://127.0.0.1:{port}"

    acked: dict[MessageId, int] = {}  # msg id -> seq the gateway answered with 2.01
    unanswered: set[MessageId] = set()  # in flight when the gateway died: state unknown
    refused: list[str] = []
    pending = list(range(TOTAL))
    killed = asyncio.Event()

    async with gateway_process(port, store, log) as first:
        publisher = await DeviceClient.create(base, ALICE, timeout=10)
        try:
            await publisher.publish(
                PresenceDocument(Status.OPEN, note="before the crash", contact=Contact(tel="+49 30 1"), lease=86400)
            )
            presence_before = await publisher.fetch_presence(ALICE)
        finally:
            await publisher.close()

        async def sender() -> None:
            client = await DeviceClient.create(base, ALICE, timeout=3)
            try:
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
                    if len(acked) >= KILL_AFTER and not killed.is_set():
                        first.send_signal(signal.SIGKILL)  # while the other senders' requests are in flight
                        killed.set()
            finally:
                await client.close()

        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(SENDERS))), 60)
        assert await asyncio.wait_for(first.wait(), 10) == -signal.SIGKILL

    assert not refused, f"the gateway refused messages: {refused}"
    assert KILL_AFTER <= len(acked) < TOTAL
    assert unanswered, "no request was in flight at the kill: the test did not kill mid-stream"
    never_sent = [message_id(i) for i in pending]

    async with gateway_process(port, store, log):  # same store, same port
        bob = await DeviceClient.create(base, BOB, timeout=10)
        alice = await DeviceClient.create(base, ALICE, timeout=10)
        try:
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
            # The presence published before the crash is intact.
            assert await bob.fetch_presence(ALICE) == presence_before

            # The sender retries what it never saw acknowledged, and sends the rest:
            # every message ends up in the inbox exactly once.
            for msg_id in sorted(unanswered) + never_sent:
                seq = await alice.send(BOB, text_of(int(msg_id[1:])), msg_id=msg_id)
                if msg_id in by_id:
                    assert seq == by_id[msg_id].seq, "a retry of a stored message got a new seq"
            final = await read_whole_inbox(bob)
            assert sorted(q.message.msg_id for q in final) == [message_id(i) for i in range(TOTAL)]
        finally:
            await bob.close()
            await alice.close()
    assert "Traceback" not in log.read_text(), log.read_text()
