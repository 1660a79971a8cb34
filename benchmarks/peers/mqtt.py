"""MQTT 3.1.1 and 5 (paho-mqtt 2.x) through one counting TCP relay per client.

Plain: the machine's Mosquitto at 127.0.0.1:1883. TLS: our own ``mosquitto`` on a free
loopback port with a throw-away self-signed certificate (openssl), started and stopped
here. The relay sits in front of the broker's port, so with TLS it counts TLS records.

Mapping of the scenario (payloads are the same CBOR bodies as the gateway's, so only
the transport differs; the topics mirror the gateway's paths):

* presence: a retained QoS 1 PUBLISH of ``{0: 1, 1: note}`` on ``p/alice@example.org``;
  Bob subscribes to that topic (QoS 1) and gets the retained message, then each change.
* IM: a QoS 1 PUBLISH on ``i/alice@example.org`` of ``{0: id, 1: "bob@example.org",
  5: text}``; the broker does not tell subscribers who published, so ``from`` travels.
* delivery acknowledgement: PUBACK only proves the hop to the broker (and the
  broker's PUBLISH to Alice is acknowledged to the broker, not to Bob), so end-to-end
  confirmation needs an application message: Alice publishes (QoS 1)
  ``{0: id, 1: "alice@example.org", 2: 1}`` on ``o/bob@example.org``, which Bob subscribes to.
Keepalive is 600 s so no PINGREQ falls into a phase. Clean session / clean start.
"""

from __future__ import annotations

import asyncio
import queue
import subprocess
import time
from pathlib import Path
from typing import Any

import cbor2

from . import PeerUnavailable, SystemRun, content, free_tcp_port, self_signed_cert, stop_process, which
from .meter import Meter, TcpRelay

TIMEOUT = 10.0
SYSTEM_BROKER = ("127.0.0.1", 1883)
TOPIC_P = f"p/{content.ALICE}"
TOPIC_I = f"i/{content.ALICE}"
TOPIC_O = f"o/{content.BOB}"


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise PeerUnavailable("paho-mqtt not installed (pip install 'paho-mqtt>=2,<3')") from exc
    return mqtt


def _port_open(address: tuple[str, int]) -> bool:
    import socket

    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


class _Client:
    def __init__(
        self, name: str, address: tuple[str, int], version: int, ca: str | None, clean_session: bool = True
    ) -> None:
        mqtt = _paho()
        self.mqtt = mqtt
        protocol = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"protocol": protocol}
        if version != 5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, **kwargs)
        if ca is not None:
            self.client.tls_set(ca_certs=ca)
            self.client.tls_insecure_set(True)  # the relay's address is not the certificate's name
        self.messages: queue.Queue[Any] = queue.Queue()
        self.connected: queue.Queue[Any] = queue.Queue()
        self.subscribed: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.put(mid)
        self.address = address
        self.version = version

    def connect(self, keepalive: int = 600) -> None:
        self.client.connect(self.address[0], self.address[1], keepalive=keepalive)
        self.client.loop_start()
        rc = self.connected.get(timeout=TIMEOUT)
        if rc.is_failure:
            raise PeerUnavailable(f"MQTT CONNECT refused: {rc}")

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self.subscribed.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        if not info.is_published():
            raise RuntimeError(f"publish on {topic} not acknowledged")

    def wait_message(self, topic: str, payload: bytes) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg.topic == topic and msg.payload == payload:
                return
        raise TimeoutError(f"no message on {topic}")

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _scenario(meter: Meter, relays: dict[str, TcpRelay], version: int, ca: str | None) -> dict[str, Any]:
    alice = _Client("alice", relays["alice"].address, version, ca)
    bob = _Client("bob", relays["bob"].address, version, ca)
    presence0 = cbor2.dumps({0: 1})
    presence1 = cbor2.dumps({0: 1, 1: content.NOTE})
    im20 = cbor2.dumps({0: content.IM20_ID, 1: content.BOB, 5: content.IM20.encode()})
    im140 = cbor2.dumps({0: content.IM140_ID, 1: content.BOB, 5: content.IM140.encode()})
    receipt = cbor2.dumps({0: content.IM20_ID, 1: content.ALICE, 2: 1})
    info: dict[str, Any] = {}
    try:
        meter.phase = "setup"
        alice.connect()
        bob.connect()
        if ca is not None:
            sock = alice.client.socket()
            info["tls"] = f"{sock.version()} {sock.cipher()[0]}"
        alice.subscribe(TOPIC_I)
        bob.subscribe(TOPIC_O)
        alice.publish(TOPIC_P, presence0, retain=True)
        meter.settle_blocking()

        meter.phase = "subscribe"
        bob.client.subscribe(TOPIC_P, qos=1)
        bob.wait_message(TOPIC_P, presence0)
        meter.settle_blocking()

        meter.phase = "publish"
        alice.publish(TOPIC_P, presence1, retain=True)
        bob.wait_message(TOPIC_P, presence1)
        meter.settle_blocking()

        meter.phase = "im20"
        bob.publish(TOPIC_I, im20)
        alice.wait_message(TOPIC_I, im20)
        meter.settle_blocking()

        meter.phase = "ack"
        alice.publish(TOPIC_O, receipt)
        bob.wait_message(TOPIC_O, receipt)
        meter.settle_blocking()

        meter.phase = "im140"
        bob.publish(TOPIC_I, im140)
        alice.wait_message(TOPIC_I, im140)
        meter.settle_blocking()

        meter.phase = "teardown"
        alice.publish(TOPIC_P, b"", retain=True)  # remove the retained presence again
    finally:
        for client in (alice, bob):
            try:
                client.close()
            except Exception:
                pass
    return info


async def _start_tls_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    binary = which("mosquitto")
    cert, key = self_signed_cert(workdir)
    port = free_tcp_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {cert}\nkeyfile {key}\n"
        "persistence false\nlog_dest none\nuser root\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise PeerUnavailable(f"mosquitto (TLS) exited {proc.returncode}: {err[-300:]}")
        if _port_open(("127.0.0.1", port)):
            return proc, port, cert
        await asyncio.sleep(0.05)
    stop_process(proc)
    raise PeerUnavailable("mosquitto (TLS) did not open its port within 5 s")


async def run(version: int, tls: bool, workdir: Path) -> SystemRun:
    _paho()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = None
    ca = None
    if tls:
        proc, port, ca = await _start_tls_broker(workdir)
        broker = ("127.0.0.1", port)
    else:
        broker = SYSTEM_BROKER
        if not _port_open(broker):
            raise PeerUnavailable("no MQTT broker at 127.0.0.1:1883 (Debian package mosquitto)")
    meter = Meter()
    relays = {leg: await TcpRelay(meter, leg, broker).start() for leg in ("alice", "bob")}
    try:
        info = await asyncio.to_thread(_scenario, meter, relays, version, ca)
    finally:
        for relay in relays.values():
            await relay.close()
        stop_process(proc)
    name = f"mqtt{'5' if version == 5 else '311'}{'-tls' if tls else ''}"
    where = "own mosquitto with a self-signed P-256 certificate" if tls else "the machine's Mosquitto at 127.0.0.1:1883"
    how = (
        f"TCP payload bytes (TLS records included) per recv() chunk through one counting TCP relay per client, "
        f"{where}; paho-mqtt {_paho_version()}"
    )
    result = SystemRun(name, meter, "tcp", how, extra=info)
    result.notes.append("delivery ack = PUBACKs + an application receipt message (PUBACK is hop-by-hop only)")
    return result


def _paho_version() -> str:
    import paho.mqtt

    return str(getattr(paho.mqtt, "__version__", "?"))
