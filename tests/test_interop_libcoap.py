"""Interoperability with another CoAP implementation: libcoap's coap-client (4.3.1)
against the gateway started as a real process, as an operator would run it.

libcoap 4.3.1 (Debian libcoap3-bin) has no OSCORE, so it is an anonymous client: it may
fetch and observe a presentity whose owner allows "anonymous" (and gets 4.01 otherwise),
and on its own it can never send an IM, which needs an authenticated sender. It can carry
an IM protected elsewhere, but cannot read the protected answer."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from aiocoap import Code, Message
from aiocoap.oscore import FilesystemSecurityContext

from device_sim.client import DeviceClient
from gateway.core import codec
from gateway.core.access import ANONYMOUS, AccessRules
from gateway.core.model import Contact, InstantMessage, MessageId, PresenceDocument, Status

from .conftest import ALICE, BOB

COAP_CLIENT = shutil.which("coap-client-notls")
pytestmark = pytest.mark.skipif(
    COAP_CLIENT is None, reason="libcoap's coap-client-notls is not installed (Debian package libcoap3-bin)"
)
REPO = Path(__file__).resolve().parent.parent


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(*argv: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


@dataclass
class GatewayProcess:
    port: int
    proc: asyncio.subprocess.Process
    stderr_path: Path
    credentials: dict[str, Path]  # device name -> credentials file (provisioned with the CLI)
    context_dirs: dict[str, Path]

    @property
    def base(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def uri(self, path: str) -> str:
        return self.base + path


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    store = f"sqlite:{tmp_path / 'gw.db'}"
    code, _, err = await run(sys.executable, "-m", "gateway", "user", "add", "--store", store, ALICE, BOB)
    assert code == 0, err
    port = free_udp_port()
    keys, devices = tmp_path / "keys", tmp_path / "devices"
    credentials: dict[str, Path] = {}
    context_dirs: dict[str, Path] = {}
    # OSCORE devices, provisioned with the CLI before the gateway starts: alice's and bob's
    # (aiocoap), and one more of bob whose requests travel through libcoap.
    for name, user in (("alice", ALICE), ("bob", BOB), ("bob-via-libcoap", BOB)):
        code, out, err = await run(
            sys.executable, "-m", "gateway", "provision", user, "--store", store, "--keys", str(keys),
            "--out", str(devices), "--gateway", f"coap://127.0.0.1:{port}",
        )
        assert code == 0, err
        found = re.search(r"^device context: (.+)$", out, re.MULTILINE)
        assert found, out
        context_dirs[name] = Path(found.group(1))
        credentials[name] = Path(f"{found.group(1)}.json")
    stderr_path = tmp_path / "gateway.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            "--keys", str(keys), cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"gateway ready" in line, f"{line!r}; stderr: {stderr_path.read_text()}"
        yield GatewayProcess(port, proc, stderr_path, credentials, context_dirs)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    # It served libcoap's requests without a traceback and stopped cleanly on SIGTERM.
    log = stderr_path.read_text()
    assert proc.returncode == 0 and "Traceback" not in log, log


@pytest.fixture
async def alice(gateway_process: GatewayProcess) -> AsyncIterator[DeviceClient]:
    """Alice's OSCORE device (aiocoap)."""
    client = await DeviceClient.create(
        gateway_process.base, ALICE, timeout=10, credentials=gateway_process.credentials["alice"]
    )
    yield client
    await client.close()


@pytest.fixture
async def bob(gateway_process: GatewayProcess) -> AsyncIterator[DeviceClient]:
    client = await DeviceClient.create(
        gateway_process.base, BOB, timeout=10, credentials=gateway_process.credentials["bob"]
    )
    yield client
    await client.close()


ANONYMOUS_READERS = AccessRules(fetchers=("*", ANONYMOUS), subscribers=("*", ANONYMOUS))


def split_cbor_sequence(data: bytes) -> list[bytes]:
    """coap-client -o appends each payload to the file: cut it into CBOR items."""
    items, stream = [], io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        cbor2.CBORDecoder(stream).decode()
        items.append(data[start : stream.tell()])
    return items


def no_error_lines(stderr: str) -> bool:
    """coap-client exits 0 even on a 4.xx/5.xx; it prints the code on stderr."""
    return not any(line[:2] in ("4.", "5.") for line in stderr.splitlines())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line[:2] in ("4.", "5.")]


async def test_libcoap_fetches_presence(gateway_process: GatewayProcess, alice: DeviceClient, tmp_path: Path) -> None:
    published = PresenceDocument(
        Status.OPEN, note="Grüße 👋 via libcoap", contact=Contact(tel="+49 30 1234"), extensions={"mood": "calm"},
        lease=300,
    )
    await alice.publish(published)
    fetch = (COAP_CLIENT or "", "-m", "get", "-A", "60", "-B", "10")
    # By default an anonymous client may not see alice's presence: it is told to authenticate.
    refused = tmp_path / "refused.cbor"
    code, _, err = await run(*fetch, "-o", str(refused), gateway_process.uri(f"/p/{ALICE}"))
    assert code == 0 and error_lines(err) == ["4.01 authenticate (OSCORE) to see this presence"], err
    assert not refused.exists() or refused.read_bytes() == b"", "a refused fetch got a document"
    # Alice (from her OSCORE device) allows anonymous fetchers and subscribers.
    await alice.put_rules(ANONYMOUS_READERS)
    assert await alice.get_rules() == ANONYMOUS_READERS
    out = tmp_path / "presence.cbor"
    code, _, err = await run(*fetch, "-o", str(out), gateway_process.uri(f"/p/{ALICE}"))
    assert code == 0 and no_error_lines(err), err
    doc = codec.decode_presence_view(out.read_bytes())
    assert (doc.status, doc.note, doc.contact, dict(doc.extensions), doc.lease, doc.version, doc.out_of_contact) == (
        Status.OPEN, "Grüße 👋 via libcoap", Contact(tel="+49 30 1234"), {"mood": "calm"}, 300, 1, False
    )


async def test_libcoap_observes_presence(gateway_process: GatewayProcess, alice: DeviceClient, tmp_path: Path) -> None:
    await alice.publish(PresenceDocument(Status.OPEN, note="zero"))
    # Fetching and subscribing are allowed separately: anonymous fetchers alone do not let
    # an anonymous client subscribe.
    await alice.put_rules(AccessRules(fetchers=("*", ANONYMOUS)))
    refused = tmp_path / "refused.cbor"
    code, _, err = await run(
        COAP_CLIENT or "", "-m", "get", "-s", "2", "-A", "60", "-B", "5", "-o", str(refused),
        gateway_process.uri(f"/p/{ALICE}"),
    )
    assert code == 0 and error_lines(err) == ["4.01 authenticate (OSCORE) to see this presence"], err
    assert not refused.exists() or refused.read_bytes() == b""
    assert await alice.watchers() == []
    await alice.put_rules(ANONYMOUS_READERS)
    out = tmp_path / "notifications.cbor"
    observer = await asyncio.create_subprocess_exec(
        COAP_CLIENT or "", "-m", "get", "-s", "4", "-A", "60", "-o", str(out), gateway_process.uri(f"/p/{ALICE}"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )

    async def documents(count: int) -> list[PresenceDocument]:
        """Wait until the observer has written ``count`` documents."""
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            data = out.read_bytes() if out.exists() else b""
            with contextlib.suppress(Exception):  # a document may be half written
                items = split_cbor_sequence(data)
                if len(items) >= count:
                    return [codec.decode_presence_view(item) for item in items]
            assert asyncio.get_running_loop().time() < deadline, f"observer wrote {data!r}, wanted {count} documents"
            await asyncio.sleep(0.02)

    try:
        assert [d.note for d in await documents(1)] == ["zero"]
        # Alice sees an anonymous watcher (RFC 2779 5.1.11).
        [watcher] = await alice.watchers()
        assert (watcher.watcher, watcher.presentity, watcher.politely_blocked) == (None, ALICE, False)
        # Observe keeps only the latest state: wait for each notification, as a watcher on a slow link would.
        await alice.publish(PresenceDocument(Status.OPEN, note="one"))
        await documents(2)
        await alice.publish(PresenceDocument(Status.CLOSED, note="two"))
        await documents(3)
        _, err = await asyncio.wait_for(observer.communicate(), 15)
    finally:
        if observer.returncode is None:
            observer.kill()
            await observer.wait()
    assert observer.returncode == 0 and no_error_lines(err.decode()), err
    seen = [codec.decode_presence_view(item) for item in split_cbor_sequence(out.read_bytes())]
    assert [(d.status, d.note, d.version) for d in seen] == [
        (Status.OPEN, "zero", 1), (Status.OPEN, "one", 2), (Status.CLOSED, "two", 3)
    ]


async def test_libcoap_posts_an_im(
    gateway_process: GatewayProcess, alice: DeviceClient, bob: DeviceClient, tmp_path: Path
) -> None:
    """An IM's sender is the principal OSCORE authenticates: libcoap 4.3.1, anonymous,
    is refused with 4.01 (even claiming to be bob, and even if alice accepts IMs from
    "anonymous"), and nothing is stored."""
    body = tmp_path / "im.cbor"
    message = InstantMessage(MessageId(b"libcoap-1"), BOB, ALICE, "Grüße via libcoap 👋".encode())
    body.write_bytes(codec.encode_message(message))
    post = (COAP_CLIENT or "", "-m", "post", "-t", "60", "-f", str(body), "-B", "10")
    for attempt, rules in enumerate((None, AccessRules(senders=("*", ANONYMOUS)))):
        if rules is not None:
            await alice.put_rules(rules)
        out = tmp_path / f"seq-{attempt}.cbor"
        code, _, err = await run(*post, "-o", str(out), gateway_process.uri(f"/i/{ALICE}"))
        assert code == 0 and error_lines(err) == ["4.01 authenticate (OSCORE) to send instant messages"], err
        assert not out.exists() or out.read_bytes() == b"", "a refused POST got a sequence number"
    batch = await alice.fetch_inbox()
    assert (batch.messages, batch.more) == ([], False)
    assert await bob.delivery_records() == []
    # The same IM from bob's OSCORE device is accepted: only the missing authentication was wrong.
    seq = await bob.send(ALICE, message.payload, msg_id=message.msg_id)
    assert [(q.seq, q.message.sender, q.message.payload) for q in (await alice.fetch_inbox()).messages] == [
        (seq, BOB, message.payload)
    ]


async def test_libcoap_carries_an_oscore_protected_im(
    gateway_process: GatewayProcess, alice: DeviceClient, tmp_path: Path
) -> None:
    """The closest libcoap 4.3.1 comes to a successful POST. The IM is OSCORE-protected
    here (with the context of a device of bob provisioned by the CLI) and libcoap sends
    the protected message as it is: its own message id, token and option encoding, the
    OSCORE option passed with -O. The gateway authenticates bob and stores the IM once.
    libcoap cannot read the protected 2.04 (option 9 is an unknown critical option to
    it, so it rejects the response, RFC 7252 5.4.1); a positive answer needs a client
    with OSCORE (libcoap >= 4.3.2 built with it, or aiocoap). It does read the
    unprotected 4.01 the gateway gives to a replay of the same protected bytes."""
    context = FilesystemSecurityContext(str(gateway_process.context_dirs["bob-via-libcoap"]))
    try:
        im = InstantMessage(MessageId(b"via-libcoap"), BOB, ALICE, "Grüße via libcoap 👋".encode())
        inner = Message(
            code=Code.POST, uri_path=["i", ALICE], content_format=60,
            payload=codec.encode_message(im, include_from=False),
        )
        outer, _ = context.protect(inner)
    finally:
        context._destroy()  # releases the context's lock file, as aiocoap does on collection
    ciphertext = tmp_path / "protected.bin"
    ciphertext.write_bytes(outer.payload)
    send = (COAP_CLIENT or "", "-m", "post", "-O", f"9,0x{outer.opt.oscore.hex()}", "-f", str(ciphertext))
    first = tmp_path / "first.bin"
    code, _, err = await run(*send, "-B", "1", "-o", str(first), gateway_process.uri(""))
    assert code == 0 and no_error_lines(err), err
    assert not first.exists(), "libcoap 4.3.1 accepted a response with an OSCORE option"
    batch = await alice.fetch_inbox()
    assert [(q.message.msg_id, q.message.sender, q.message.payload) for q in batch.messages] == [
        (im.msg_id, BOB, im.payload)
    ]
    # The same protected bytes again (libcoap picks a new message id): a replay, refused.
    code, _, err = await run(*send, "-B", "5", gateway_process.uri(""))
    assert code == 0 and error_lines(err) == ["4.01 Replay detected"], err
    assert len((await alice.fetch_inbox()).messages) == 1
