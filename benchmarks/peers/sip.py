"""SIP SIMPLE over UDP: PUBLISH (RFC 3903), SUBSCRIBE/NOTIFY (RFC 3856, RFC 6665) with
PIDF bodies (RFC 3863), MESSAGE (RFC 3428) with CPIM (RFC 3862) and IMDN delivery
notifications (RFC 5438).

No SIP presence server is run. The requests are generated here, in the real formats
with the headers RFC 3261 8.1.1 requires plus those of each extension (no
User-Agent, Allow, Supported or other optional headers, so these are lean SIP
messages). They are sent as real UDP datagrams through the counting relays to SIPp
(Debian package ``sip-tester``) instances running ``sipp/uas.xml``, which answer each
with the 200 OK a UAS builds (Via, From, To, Call-ID, CSeq copied; SIP-ETag on a
PUBLISH, Contact and Expires on a SUBSCRIBE). So the requests are generated and the
responses come from SIPp, and both are counted on the socket.

Roles: three SIPp instances play the presence server/proxy and the user agents of
Alice and Bob; Python sends Alice's and Bob's requests (legs ``alice``/``bob``, up) and
the server's (NOTIFY; a MESSAGE forwarded by the proxy with its own Via on top and
Max-Forwards 69; legs ``alice``/``bob``, down). An IM crosses two legs (Bob -> proxy,
proxy -> Alice), each a request and a 200 OK; so does the IMDN back to Bob.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import PeerUnavailable, SystemRun, content, free_udp_port, stop_process, which
from .meter import Meter, UdpRelay

TIMEOUT = 5.0
SCENARIO = Path(__file__).with_name("sipp") / "uas.xml"
CRLF = "\r\n"


def pidf(entity: str, note: str | None) -> str:
    """A PIDF document (RFC 3863 4.1): one tuple, basic status, optional note."""
    note_line = f"    <note>{note}</note>\n" if note is not None else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="pres:{entity}">\n'
        '  <tuple id="t1">\n'
        "    <status><basic>open</basic></status>\n"
        f"{note_line}"
        "  </tuple>\n"
        "</presence>\n"
    )


def cpim_im(sender: str, recipient: str, msg_id: str, when: str, text: str) -> str:
    """An IM in CPIM (RFC 3862) asking for a delivery notification (RFC 5438 6.2)."""
    body = text.encode()
    return CRLF.join([
        f"From: <im:{sender}>",
        f"To: <im:{recipient}>",
        "NS: imdn <urn:ietf:params:imdn>",
        f"imdn.Message-ID: {msg_id}",
        f"DateTime: {when}",
        "imdn.Disposition-Notification: positive-delivery",
        "",
        "Content-Type: text/plain;charset=utf-8",
        f"Content-Length: {len(body)}",
        "",
        text,
    ])


def cpim_imdn(sender: str, recipient: str, own_id: str, original_id: str, when: str) -> str:
    """A delivery notification (RFC 5438 7.2.1) in CPIM."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<imdn xmlns="urn:ietf:params:xml:ns:imdn">\n'
        f"<message-id>{original_id}</message-id>\n"
        f"<datetime>{when}</datetime>\n"
        "<delivery-notification><status><delivered/></status></delivery-notification>\n"
        "</imdn>\n"
    )
    return CRLF.join([
        f"From: <im:{sender}>",
        f"To: <im:{recipient}>",
        "NS: imdn <urn:ietf:params:imdn>",
        f"imdn.Message-ID: {own_id}",
        f"DateTime: {when}",
        "",
        "Content-Type: message/imdn+xml",
        "Content-Disposition: notification",
        f"Content-Length: {len(xml.encode())}",
        "",
        xml,
    ])


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    cseq: int = 0
    remote_tag: str | None = None


class Tokens:
    """Branch ids, tags and Call-IDs of realistic length from a seeded generator."""

    def __init__(self, seed: int = 7) -> None:
        self.random = random.Random(seed)

    def token(self, length: int) -> str:
        return "".join(self.random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(length))

    def branch(self) -> str:
        return "z9hG4bK" + self.token(10)  # RFC 3261 8.1.1.7 magic cookie + a unique part


def request(
    method: str, ruri: str, via: str, branch: str, from_uri: str, from_tag: str, to_uri: str, to_tag: str | None,
    call_id: str, cseq: int, headers: list[str], body: str = "", content_type: str | None = None,
    extra_via: str | None = None, max_forwards: int = 70,
) -> bytes:
    data = body.encode()
    lines = [f"{method} {ruri} SIP/2.0"]
    if extra_via is not None:
        lines.append(extra_via)
    lines += [
        f"Via: SIP/2.0/UDP {via};branch={branch};rport",
        f"Max-Forwards: {max_forwards}",
        f"From: <{from_uri}>;tag={from_tag}",
        f"To: <{to_uri}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *headers,
    ]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(data)}")
    return (CRLF.join(lines) + CRLF + CRLF).encode() + data


def _header(response: bytes, name: str) -> str | None:
    for line in response.decode(errors="replace").split(CRLF):
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


class Endpoint:
    """A Python UDP socket that sends a request through a relay and waits for the 200."""

    def __init__(self, relay: UdpRelay) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sock.connect(relay.address)
        self.via = f"127.0.0.1:{self.sock.getsockname()[1]}"

    async def exchange(self, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, data)
        response = await asyncio.wait_for(loop.sock_recv(self.sock, 65535), TIMEOUT)
        if not response.startswith(b"SIP/2.0 200"):
            raise RuntimeError(f"SIPp answered {response[:40]!r}")
        return response

    def close(self) -> None:
        self.sock.close()


async def _start_sipp(workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    sipp = which("sipp")
    port = free_udp_port()
    proc = subprocess.Popen(
        [sipp, "-sf", str(SCENARIO), "-i", "127.0.0.1", "-p", str(port), "-bind_local", "-nostdin", "-nd"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise PeerUnavailable(f"sipp ({name}) exited {proc.returncode}: {err[-300:]}")
        if _udp_bound(port):
            return proc, port
        await asyncio.sleep(0.05)
    stop_process(proc)
    raise PeerUnavailable(f"sipp ({name}) did not bind udp/{port} within 5 s")


def _udp_bound(port: int) -> bool:
    """True once someone (SIPp) holds 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def run(workdir: Path) -> SystemRun:
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    meter = Meter()
    relays: list[UdpRelay] = []
    endpoints: list[Endpoint] = []
    try:
        ports = {}
        for role in ("server", "alice-ua", "bob-ua"):
            proc, ports[role] = await _start_sipp(workdir, role)
            procs.append(proc)
        server = ("127.0.0.1", ports["server"])
        up = {leg: await UdpRelay(meter, leg, server).start() for leg in ("alice", "bob")}
        down = {
            leg: await UdpRelay(meter, leg, ("127.0.0.1", ports[f"{leg}-ua"]), initiator_is_server=True).start()
            for leg in ("alice", "bob")
        }
        relays += [*up.values(), *down.values()]
        alice, bob = Endpoint(up["alice"]), Endpoint(up["bob"])
        to_alice, to_bob = Endpoint(down["alice"]), Endpoint(down["bob"])
        endpoints += [alice, bob, to_alice, to_bob]
        tok = Tokens()
        a_uri, b_uri = f"sip:{content.ALICE}", f"sip:{content.BOB}"
        a_contact = f"<sip:alice@127.0.0.1:{ports['alice-ua']}>"
        b_contact = f"<sip:bob@127.0.0.1:{ports['bob-ua']}>"
        server_contact = f"<sip:presence@{server[0]}:{server[1]}>"
        host = "127.0.0.1"

        def now() -> str:
            return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        meter.phase = "setup"
        publication = Dialog(f"{tok.token(16)}@{host}", tok.token(10))

        async def publish(note: str | None, etag: str | None) -> bytes:
            publication.cseq += 1
            headers = ["Event: presence", "Expires: 3600"] + ([f"SIP-If-Match: {etag}"] if etag else [])
            data = request(
                "PUBLISH", a_uri, alice.via, tok.branch(), a_uri, publication.local_tag, a_uri, None,
                publication.call_id, publication.cseq, headers, pidf(content.ALICE, note), "application/pidf+xml",
            )
            return await alice.exchange(data)

        first = await publish(None, None)  # Alice comes online (OPEN, no note)
        etag = _header(first, "SIP-ETag")
        await meter.settle()

        subscription = Dialog(f"{tok.token(16)}@{host}", tok.token(10))
        notify_cseq = 0

        async def notify(note: str | None) -> None:
            nonlocal notify_cseq
            notify_cseq += 1
            data = request(
                "NOTIFY", f"sip:bob@127.0.0.1:{ports['bob-ua']}", to_bob.via, tok.branch(), a_uri,
                subscription.remote_tag or "", b_uri, subscription.local_tag, subscription.call_id, notify_cseq,
                [f"Contact: {server_contact}", "Event: presence", "Subscription-State: active;expires=3600"],
                pidf(content.ALICE, note), "application/pidf+xml",
            )
            await to_bob.exchange(data)

        meter.phase = "subscribe"
        subscription.cseq += 1
        answer = await bob.exchange(request(
            "SUBSCRIBE", a_uri, bob.via, tok.branch(), b_uri, subscription.local_tag, a_uri, None,
            subscription.call_id, subscription.cseq,
            [f"Contact: {b_contact}", "Event: presence", "Expires: 3600", "Accept: application/pidf+xml"],
        ))
        to_header = _header(answer, "To") or ""
        subscription.remote_tag = to_header.partition(";tag=")[2] or tok.token(10)
        await notify(None)  # RFC 6665 4.2.1: an immediate NOTIFY with the current state
        await meter.settle()

        meter.phase = "publish"
        await publish(content.NOTE, etag)
        await notify(content.NOTE)
        await meter.settle()

        async def message(sender: Endpoint, forward: Endpoint, from_uri: str, to_uri: str, contact: str,
                          body: str) -> None:
            dialog = Dialog(f"{tok.token(16)}@{host}", tok.token(10), 1)
            branch = tok.branch()
            await sender.exchange(request(
                "MESSAGE", to_uri, sender.via, branch, from_uri, dialog.local_tag, to_uri, None, dialog.call_id, 1,
                [], body, "message/cpim",
            ))
            target = contact.strip("<>")
            await forward.exchange(request(
                "MESSAGE", target, sender.via, branch, from_uri, dialog.local_tag, to_uri, None, dialog.call_id, 1,
                [], body, "message/cpim", max_forwards=69,
                extra_via=f"Via: SIP/2.0/UDP {forward.via};branch={tok.branch()}",
            ))

        ims = (("im20", content.IM20, content.IM20_ID), ("im140", content.IM140, content.IM140_ID))
        for phase, text, msg_id in ims:
            if phase == "im140":
                meter.phase = "ack"
                imdn = cpim_imdn(content.ALICE, content.BOB, tok.token(16), content.IM20_ID.hex(), now())
                await message(alice, to_bob, a_uri, b_uri, b_contact, imdn)
                await meter.settle()
            meter.phase = phase
            im = cpim_im(content.BOB, content.ALICE, msg_id.hex(), now(), text)
            await message(bob, to_alice, b_uri, a_uri, a_contact, im)
            await meter.settle()
        meter.phase = "teardown"
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for relay in relays:
            relay.close()
        for proc in procs:
            stop_process(proc)
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "sip-tester"], capture_output=True, timeout=10)
    how = (
        "UDP payload of every datagram through counting UDP relays; requests generated in Python (RFC formats, "
        f"lean headers), 200 OK responses from SIPp {version.stdout.decode().strip() or '?'} (uas.xml)"
    )
    result = SystemRun("sip-simple", meter, "udp", how)
    result.notes.append("IM = MESSAGE with CPIM asking for an IMDN, over 2 legs (UA->proxy->UA), each with its 200 OK; "
                        "ack = IMDN delivery notification (RFC 5438) over 2 legs; REGISTER not sent (setup only)")
    return result
