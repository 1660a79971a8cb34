"""Interoperability with another CoAP implementation: libcoap's coap-client (4.3.1)
against the gateway started as a real process, as an operator would run it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest

from device_sim.client import DeviceClient
from gateway.core import codec
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
    stderr_path = tmp_path / "gateway.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--bind", f"127.0.0.1:{port}", "--store", store,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"gateway ready" in line, f"{line!r}; stderr: {stderr_path.read_text()}"
        yield GatewayProcess(port, proc, stderr_path)
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
    client = await DeviceClient.create(gateway_process.base, ALICE, timeout=10)
    yield client
    await client.close()


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


async def test_libcoap_fetches_presence(gateway_process: GatewayProcess, alice: DeviceClient, tmp_path: Path) -> None:
    published = PresenceDocument(
        Status.OPEN, note="Grüße 👋 via libcoap", contact=Contact(tel="+49 30 1234"), extensions={"mood": "calm"},
        lease=300,
    )
    await alice.publish(published)
    out = tmp_path / "presence.cbor"
    code, _, err = await run(
        COAP_CLIENT or "", "-m", "get", "-A", "60", "-B", "10", "-o", str(out), gateway_process.uri(f"/p/{ALICE}")
    )
    assert code == 0 and no_error_lines(err), err
    doc = codec.decode_presence_view(out.read_bytes())
    assert (doc.status, doc.note, doc.contact, dict(doc.extensions), doc.lease, doc.version, doc.out_of_contact) == (
        Status.OPEN, "Grüße 👋 via libcoap", Contact(tel="+49 30 1234"), {"mood": "calm"}, 300, 1, False
    )


async def test_libcoap_observes_presence(gateway_process: GatewayProcess, alice: DeviceClient, tmp_path: Path) -> None:
    await alice.publish(PresenceDocument(Status.OPEN, note="zero"))
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


async def test_libcoap_posts_an_im(gateway_process: GatewayProcess, alice: DeviceClient, tmp_path: Path) -> None:
    body = tmp_path / "im.cbor"
    message = InstantMessage(MessageId(b"libcoap-1"), BOB, ALICE, "Grüße via libcoap 👋".encode())
    body.write_bytes(codec.encode_message(message))
    seqs = []
    for attempt in range(2):  # the second POST is a resend: stored once, same answer
        out = tmp_path / f"seq-{attempt}.cbor"
        code, _, err = await run(
            COAP_CLIENT or "", "-m", "post", "-t", "60", "-f", str(body), "-B", "10", "-o", str(out),
            gateway_process.uri(f"/i/{ALICE}"),
        )
        assert code == 0 and no_error_lines(err), err
        seqs.append(codec.decode_seq(out.read_bytes()))
    assert seqs[0] == seqs[1] >= 1
    batch = await alice.fetch_inbox()
    assert [(q.seq, q.message) for q in batch.messages] == [(seqs[0], message)] and not batch.more
