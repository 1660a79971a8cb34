"""XMPP over TLS: our own Prosody (Debian package ``prosody``) and slixmpp clients, one
counting TCP relay in front of Prosody's c2s port per client.

Prosody runs from a config file, data directory and certificate in the work
directory, c2s on a free 127.0.0.1 port, s2s/HTTP/offline storage off,
``c2s_require_encryption = true`` (STARTTLS), two users made with ``prosodyctl
register``. The relay sees the TLS records, i.e. what goes on the wire.

Mapping of the scenario (RFC 6120/6121, XEP-0184):

* presence publish: ``<presence><status>note</status></presence>`` (available = OPEN);
  Prosody broadcasts it to Bob (the notification) and, per RFC 6121 4.2.2 and 4.4.2,
  back to Alice's own resource: that echo is booked to ``publish``.
* subscribe: Bob sends ``<presence type='subscribe'>``; Alice's client approves it
  (slixmpp ``auto_authorize``, no subscription back); Prosody pushes roster updates to
  both and sends Alice's current presence to Bob. Every leg is booked to it.
* IM: ``<message type='chat'>`` with ``<body>`` and a XEP-0184 ``<request/>``.
* delivery acknowledgement: the XEP-0184 ``<received/>`` message as slixmpp's
  ``xep_0184`` plugin sends it (``ack()``, no stanza id), routed by Prosody to Bob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import PeerUnavailable, SystemRun, content, free_tcp_port, next_matching, self_signed_cert, stop_process, which
from .meter import Meter, TcpRelay

TIMEOUT = 10.0
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}


def _config(workdir: Path, port: int, cert: str, key: str, interface: str = "127.0.0.1") -> Path:
    """Prosody's config; ``interface`` is the address c2s listens on (benchmarks/link.py: a namespace's)."""
    conf = workdir / "prosody.cfg.lua"
    conf.write_text(
        f"""-- benchmark instance (benchmarks/peers/xmpp.py)
pidfile = "{workdir}/prosody.pid"
data_path = "{workdir}/data"
certificates = "{workdir}"
interfaces = {{ "{interface}" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "posix" }}
modules_disabled = {{ "s2s", "offline" }}
authentication = "internal_hashed"
c2s_require_encryption = true
allow_registration = false
run_as_root = true
log = {{ {{ levels = {{ min = "warn" }}, to = "file", filename = "{workdir}/prosody.log" }} }}
ssl = {{ key = "{key}", certificate = "{cert}" }}
VirtualHost "{content.DOMAIN}"
"""
    )
    return conf


async def _start_prosody(workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    prosody = which("prosody")
    prosodyctl = which("prosodyctl")
    cert, key = self_signed_cert(workdir)
    (workdir / "data").mkdir(exist_ok=True)
    port = free_tcp_port()
    conf = _config(workdir, port, cert, key)
    for user, password in PASSWORDS.items():
        made = subprocess.run(
            [prosodyctl, "--config", str(conf), "register", user, content.DOMAIN, password],
            capture_output=True, timeout=30,
        )
        if made.returncode != 0:
            raise PeerUnavailable(f"prosodyctl register failed: {made.stderr.decode(errors='replace')[-300:]}")
    proc = subprocess.Popen([prosody, "--config", str(conf), "-F"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise PeerUnavailable(f"prosody exited {proc.returncode}: {err[-300:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return proc, port, cert
        except OSError:
            await asyncio.sleep(0.05)
    stop_process(proc)
    raise PeerUnavailable("prosody did not open its c2s port within 10 s")


def _client_class() -> Any:
    try:
        import slixmpp
    except ImportError as exc:
        raise PeerUnavailable("slixmpp not installed (pip install 'slixmpp>=1.8,<2')") from exc

    class Client(slixmpp.ClientXMPP):
        def __init__(self, jid: str, password: str, ca: str) -> None:
            super().__init__(jid, password)
            self.ca_certs = Path(ca)
            self.register_plugin("xep_0184", {"auto_ack": False, "auto_request": False})
            self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.presences: asyncio.Queue[Any] = asyncio.Queue()
            self.messages: asyncio.Queue[Any] = asyncio.Queue()
            self.receipts: asyncio.Queue[Any] = asyncio.Queue()
            self.add_event_handler("session_start", self._start)
            self.add_event_handler("failed_auth", lambda *_: self._fail("authentication failed"))
            self.add_event_handler("presence_available", self.presences.put_nowait)
            self.add_event_handler("message", self.messages.put_nowait)
            self.add_event_handler("receipt_received", self.receipts.put_nowait)

        def _fail(self, why: str) -> None:
            if not self.ready.done():
                self.ready.set_exception(PeerUnavailable(why))

        async def _start(self, _event: Any) -> None:
            await self.get_roster()
            if not self.ready.done():
                self.ready.set_result(None)

    return Client


async def disconnect_all(clients: Iterable[Any], wait: float, timeout: float) -> None:
    """Close every client's stream (``wait``: for its closing tag), then wait for each to
    be gone; a client already gone or failing to close is no reason to stop."""
    clients = list(clients)
    for client in clients:
        with contextlib.suppress(Exception):
            client.disconnect(wait=wait)
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnected, timeout)


async def _until(queue: asyncio.Queue[Any], check: Any) -> Any:
    return await next_matching(queue, check, TIMEOUT)


async def run(workdir: Path) -> SystemRun:
    client_class = _client_class()
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    workdir.mkdir(parents=True, exist_ok=True)
    proc, port, cert = await _start_prosody(workdir)
    meter = Meter()
    relays: dict[str, TcpRelay] = {}
    clients: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        relays = {leg: await TcpRelay(meter, leg, ("127.0.0.1", port)).start() for leg in ("alice", "bob")}
        meter.phase = "setup"
        for leg, jid in (("alice", content.ALICE), ("bob", content.BOB)):
            client = client_class(jid, PASSWORDS[leg], cert)
            client.roster.auto_authorize = True
            client.roster.auto_subscribe = False
            clients[leg] = client
            client.connect(*relays[leg].address)
            await asyncio.wait_for(client.ready, TIMEOUT)
        alice, bob = clients["alice"], clients["bob"]
        ssl_object = alice.transport.get_extra_info("ssl_object") if alice.transport else None
        if ssl_object is not None:
            extra["tls"] = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
        alice.send_presence()
        bob.send_presence()
        await _until(alice.presences, lambda p: p["from"].bare == content.ALICE)
        await meter.settle()

        meter.phase = "subscribe"
        bob.send_presence(pto=content.ALICE, ptype="subscribe")
        await _until(bob.presences, lambda p: p["from"].bare == content.ALICE)
        await meter.settle()

        meter.phase = "publish"
        alice.send_presence(pstatus=content.NOTE)
        await _until(bob.presences, lambda p: p["from"].bare == content.ALICE and p["status"] == content.NOTE)
        await meter.settle()

        received: dict[str, Any] = {}
        ims = (("im20", content.IM20, content.IM20_ID), ("im140", content.IM140, content.IM140_ID))
        for phase, text, msg_id in ims:
            if phase == "im140":
                meter.phase = "ack"
                alice.plugin["xep_0184"].ack(received["im20"])
                await _until(bob.receipts, lambda m: m["receipt"] == content.IM20_ID.hex())
                await meter.settle()
            meter.phase = phase
            message = bob.make_message(mto=content.ALICE, mbody=text, mtype="chat")
            message["id"] = msg_id.hex()
            message["request_receipt"] = True
            message.send()
            received[phase] = await _until(alice.messages, lambda m, t=text: m["body"] == t)
            await meter.settle()
        meter.phase = "teardown"
    finally:
        await disconnect_all(clients.values(), wait=0.5, timeout=2)
        for relay in relays.values():
            await relay.close()
        stop_process(proc)
    how = (
        "TCP payload bytes (TLS records) per recv() chunk through one counting TCP relay per client in front of "
        f"our own Prosody ({_version(which('prosody'))}, STARTTLS required), clients slixmpp {_slixmpp_version()}"
    )
    result = SystemRun("xmpp-tls", meter, "tcp", how, extra=extra)
    result.notes.append("subscribe includes Alice's approval and both roster pushes; publish includes the echo of "
                        "Alice's presence to her own resource (RFC 6121 4.2.2)")
    return result


def _version(binary: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "prosody"], capture_output=True, timeout=10)
        return f"Prosody {out.stdout.decode().strip()}"
    except Exception:
        return binary


def _slixmpp_version() -> str:
    import slixmpp

    return str(slixmpp.__version__)
