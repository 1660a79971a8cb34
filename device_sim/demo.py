"""`make run`: start the gateway on udp/5683 with an SQLite store and let simulated devices talk.

Two devices publish presence, subscribe to each other and exchange IMs; a third is
away while a message is sent to it and collects it when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.core.ids import UserId
from gateway.core.model import Contact, PresenceDocument, Status

from .client import DeviceClient

ALICE, BOB, CAROL = UserId("alice@example.org"), UserId("bob@example.org"), UserId("carol@example.org")
_T0 = time.monotonic()


def say(who: str, text: str) -> None:
    print(f"[{time.monotonic() - _T0:6.2f}s] {who:<6} {text}", flush=True)


def describe(doc: PresenceDocument) -> str:
    state = "out-of-contact" if doc.out_of_contact else doc.status.name
    return f"{state} note={doc.note!r} v{doc.version}"


@contextlib.asynccontextmanager
async def gateway_process(port: int, store: Path) -> AsyncIterator[dict[UserId, Path]]:
    """Register and provision the demo's users with the CLI, then serve; yields each
    user's OSCORE credentials file."""
    store.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    keys, devices = Path(f"{store}.keys"), Path(f"{store}.devices")
    shutil.rmtree(keys, ignore_errors=True)
    shutil.rmtree(devices, ignore_errors=True)
    url = f"sqlite:{store}"
    gateway_cli = [sys.executable, "-m", "gateway"]
    subprocess.run([*gateway_cli, "user", "add", "--store", url, ALICE, BOB, CAROL], check=True)
    credentials = {}
    for user in (ALICE, BOB, CAROL):
        provision = [*gateway_cli, "provision", user, "--store", url, "--keys", str(keys), "--out", str(devices)]
        subprocess.run([*provision, "--gateway", f"coap://127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
        [credentials[user]] = devices.glob(f"{user}-*.json")
    say("gw", f"provisioned an OSCORE context for each of {len(credentials)} devices")
    serve = [*gateway_cli, "serve", "--bind", f"127.0.0.1:{port}", "--store", url, "--keys", str(keys)]
    proc = await asyncio.create_subprocess_exec(*serve, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line:
            raise SystemExit(f"gateway did not start (is udp/{port} in use?)")
        say("gw", line.decode().strip())
        yield credentials
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
        say("gw", f"stopped (exit {proc.returncode})")


async def follow(device: DeviceClient, presentity: UserId, seen: asyncio.Queue[PresenceDocument]) -> None:
    async for doc in device.watch(presentity):
        say(device.user.split("@")[0], f"sees {presentity.split('@')[0]}: {describe(doc)}")
        await seen.put(doc)


async def read_inbox(device: DeviceClient, got: asyncio.Queue[str]) -> None:
    async for batch in device.watch_inbox():
        for queued in batch.messages:
            text = queued.message.payload.decode("utf-8", "replace")
            say(device.user.split("@")[0], f"got IM #{queued.seq} from {queued.message.sender}: {text!r}")
            await got.put(text)
        if batch.messages:
            await device.acknowledge(batch.cursor)
            say(device.user.split("@")[0], f"acknowledged up to #{batch.cursor}")


async def run_demo(port: int, store: Path) -> None:
    base = f"coap://127.0.0.1:{port}"
    async with gateway_process(port, store) as credentials:
        alice = await DeviceClient.create(base, ALICE, timeout=10, credentials=credentials[ALICE])
        bob = await DeviceClient.create(base, BOB, timeout=10, credentials=credentials[BOB])
        tasks: list[asyncio.Task[None]] = []
        try:
            await alice.publish(
                PresenceDocument(Status.OPEN, note="at my desk", contact=Contact(tel="+49 30 1234"), lease=300)
            )
            say("alice", "published OPEN 'at my desk' (lease 300 s)")
            await bob.publish(PresenceDocument(Status.OPEN, note="on the road", lease=300))
            say("bob", "published OPEN 'on the road' (lease 300 s)")

            alice_sees: asyncio.Queue[PresenceDocument] = asyncio.Queue()
            bob_sees: asyncio.Queue[PresenceDocument] = asyncio.Queue()
            bob_got: asyncio.Queue[str] = asyncio.Queue()
            alice_got: asyncio.Queue[str] = asyncio.Queue()
            tasks += [
                asyncio.create_task(follow(alice, BOB, alice_sees)),
                asyncio.create_task(follow(bob, ALICE, bob_sees)),
                asyncio.create_task(read_inbox(bob, bob_got)),
                asyncio.create_task(read_inbox(alice, alice_got)),
            ]
            await asyncio.wait_for(alice_sees.get(), 10)
            await asyncio.wait_for(bob_sees.get(), 10)

            await alice.send(BOB, "Hello Bob!")
            say("alice", "sent 'Hello Bob!'")
            await alice.send(BOB, "Grüße aus Köln 👋")
            say("alice", "sent 'Grüße aus Köln 👋'")
            for _ in range(2):
                await asyncio.wait_for(bob_got.get(), 10)
            await bob.send(ALICE, "Hi Alice, driving, talk later", reply_to=BOB)
            say("bob", "replied")
            await asyncio.wait_for(alice_got.get(), 10)
            await asyncio.sleep(0.3)
            for record in await alice.delivery_records():
                say("alice", f"delivery of {record.msg_id.hex()} to {record.recipient}: {record.state.name}")

            await bob.publish(PresenceDocument(Status.CLOSED, note="parked, phone off"))
            say("bob", "published CLOSED")
            await asyncio.wait_for(alice_sees.get(), 10)

            seq = await alice.send(CAROL, "Carol, call me when you land")
            say("alice", f"sent to carol (away): stored as #{seq}")
            carol = await DeviceClient.create(base, CAROL, timeout=10, credentials=credentials[CAROL])
            try:
                batch = await carol.fetch_inbox()
                for queued in batch.messages:
                    say(
                        "carol",
                        f"back online, fetched #{queued.seq} from {queued.message.sender}: "
                        f"{queued.message.payload.decode()!r}",
                    )
                await carol.acknowledge(batch.cursor)
                say("carol", f"acknowledged up to #{batch.cursor}")
            finally:
                await carol.close()
            records = await alice.delivery_records()
            say("alice", f"delivery of last message: {records[0].state.name}")
            say("demo", "done")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await alice.close()
            await bob.close()


def main(port: int = 5683, store: str = "var/demo.db") -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(run_demo(port, Path(store)))
    return 0
