"""IMs and presence changes across the emulated link, packet level: this gateway (CoAP +
OSCORE) against Mosquitto (MQTT 3.1.1, QoS 1) and Prosody (XMPP over TLS), side by side.

``python -m benchmarks link [--profile gprs] [--count 100] [--seed 1] [--window 1]
[--systems ours,mqtt,xmpp-tls] [--out var/bench]`` (root: network namespaces, TUN devices)

For each system in turn: a fresh :class:`device_sim.tun.PacketLink` with the profile and
the seed (so every system meets the same link model from its start); the server in the
gateway namespace (``ip netns exec``: ``python -m gateway serve`` with SQLite and OSCORE
for ours, a private ``mosquitto``, a private Prosody with STARTTLS required); then one
client process in the device namespace (:mod:`benchmarks.link_client`) holding two
clients: Alice sends ``--count`` IMs to Bob, then publishes ``--count`` presence changes
that Bob watches. Both cross the emulated link, like two phones on the same cell (they
share its bandwidth and queue).

Policy, the same for every system: Alice has at most ``--window`` (default 1) items that
Bob has not yet received; an item leaves the window when Bob's application gets it,
when Alice's protocol reports it failed, or after ``--item-timeout`` (default the
profile's CoAP MAX_TRANSMIT_WAIT); until then senders keep trying (ours resends after a
CoAP give-up, paho across reconnects, TCP retransmits). Latency: from Alice's send call to
Bob's application, one clock (both clients are in one process). Each receiver does what its
protocol needs for reliable delivery (ours: acknowledge the inbox, and poll / observe again
when an observation went silent; MQTT: PUBACK, persistent session; XMPP: nothing beyond TCP).
Idle sessions are kept alive every ``--refresh`` seconds, each its own way.

Bytes and packets are the link's own counters (IP packets offered to the link model,
headers, retransmissions and pure ACKs included), read between phases after the link
went quiet, so every packet is booked to the phase that caused it. ``setup`` (connect,
TLS, subscribe) is reported apart; the headline figures are the ``im`` and
``presence`` phases.

Writes ``link.json`` and ``link.png`` in ``--out``; prints a table; the last stdout line
is one JSON object. Exits 2 when packet-level mode cannot run here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_sim.profiles import LinkProfile, get_profile, profile_names
from device_sim.report import percentiles
from device_sim.tun import (
    DEFAULT_GATEWAY_ADDR,
    PacketCounters,
    PacketDuplexCounters,
    PacketLink,
    packet_link_unavailable,
)

from .payload import table as payload_table
from .peers import PeerUnavailable, content, self_signed_cert, which

ROOT = Path(__file__).resolve().parents[1]
OURS = "ours"
SYSTEMS = ("ours", "mqtt", "xmpp-tls", "mqtt-tls")
DEFAULT_SYSTEMS = ("ours", "mqtt", "xmpp-tls")
PORTS = {"ours": 5683, "mqtt": 1883, "mqtt-tls": 8883, "xmpp-tls": 5222}
DESCRIPTIONS = {
    "ours": "this gateway: CoAP + OSCORE + CBOR, `python -m gateway serve` (SQLite), devices = DeviceClient",
    "mqtt": "Mosquitto, MQTT 3.1.1 QoS 1, no TLS, paho-mqtt clients",
    "mqtt-tls": "Mosquitto, MQTT 3.1.1 QoS 1 over TLS, paho-mqtt clients",
    "xmpp-tls": "Prosody, XMPP with STARTTLS required, slixmpp clients",
}
KINDS = ("im", "presence")
PHASES = ("setup", "im", "presence", "teardown")
GATEWAY_ADDR = DEFAULT_GATEWAY_ADDR  # PacketLink's default: the servers listen here


def progress(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Timing derived from the profile


@dataclass(frozen=True)
class Timing:
    item_timeout: float
    setup_timeout: float
    quiet_s: float  # the link counts as settled after this long without a packet
    settle_limit_s: float  # ... or after this long anyway
    give_up_after: int
    refresh: float  # keep-alive period of an idle session (link_client.Liveness)
    grace: float  # ours: a notification is overdue this long after a poll found news

    @classmethod
    def of(cls, profile: LinkProfile, item_timeout: float | None, give_up_after: int, refresh: float) -> Timing:
        slowest_round_trip = profile.rtt_bounds_s()[1]
        quiet = min(5.0, max(0.3, 1.5 * slowest_round_trip))
        item = item_timeout if item_timeout is not None else profile.max_transmit_wait
        return cls(item, max(20.0, profile.max_transmit_wait), quiet, min(60.0, max(5.0, 10 * quiet)), give_up_after,
                   refresh, 2 * slowest_round_trip + 3.0)  # grace as device_sim/fleet.py derives it

    def system_budget(self, count: int, window: int) -> float:
        """Longest a system's client may take: every wait it has is bounded, and this is more than their sum
        (a few setup steps of up to setup_timeout each, the items, the phases' drains and handshakes)."""
        rounds = 2 * math.ceil(count / window)
        return 30.0 + 6 * self.setup_timeout + rounds * (self.item_timeout + 1.0) + 2 * self.item_timeout \
            + len(PHASES) * (self.settle_limit_s + 5.0) + 60.0


# ---------------------------------------------------------------------------
# Servers: prepared before the link exists (blocking steps would stall its forwarding),
# started in the gateway namespace once it does.


@dataclass
class Server:
    argv: list[str]
    port: int
    log: Path
    ready_line: str | None = None  # wait for this on stdout; otherwise for the TCP port
    client_args: list[str] = field(default_factory=list)


def _run(argv: list[str], what: str, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{what}: {exc}") from exc
    if done.returncode != 0:
        raise PeerUnavailable(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


def prepare_ours(workdir: Path, profile: LinkProfile) -> Server:
    """Register and provision Alice and Bob with the gateway's own CLI, as README.md shows."""
    store = f"sqlite:{workdir / 'gateway.db'}"
    keys, devices = workdir / "keys", workdir / "devices"
    gateway_cli = [sys.executable, "-m", "gateway"]
    _run([*gateway_cli, "user", "add", "--store", store, content.ALICE, content.BOB], "gateway user add")
    credentials: dict[str, str] = {}
    for user in (content.ALICE, content.BOB):
        out = _run([*gateway_cli, "provision", user, "--store", store, "--keys", str(keys), "--out", str(devices),
                    "--gateway", f"coap://{GATEWAY_ADDR}:{PORTS[OURS]}"], f"gateway provision {user}")
        found = [line.split(None, 1)[1].split()[0] for line in out.splitlines() if line.startswith("credentials:")]
        if not found:
            raise PeerUnavailable(f"gateway provision printed no credentials file: {out.strip()[-200:]}")
        credentials[user] = found[0]
    return Server(
        [*gateway_cli, "serve", "--bind", f"{GATEWAY_ADDR}:{PORTS[OURS]}", "--store", store, "--keys", str(keys),
         "--domain", content.DOMAIN],
        PORTS[OURS], workdir / "gateway.log", ready_line="gateway ready",
        client_args=["--alice-credentials", credentials[content.ALICE], "--bob-credentials", credentials[content.BOB],
                     "--ack-timeout", str(profile.ack_timeout), "--max-retransmit", str(profile.max_retransmit)],
    )


def prepare_mosquitto(workdir: Path, tls: bool) -> Server:
    from .peers import mqtt

    mqtt._paho()  # PeerUnavailable when paho-mqtt is missing
    binary = which("mosquitto")
    port = PORTS["mqtt-tls" if tls else "mqtt"]
    lines = [f"listener {port} {GATEWAY_ADDR}", "allow_anonymous true", "persistence false",
             f"log_dest file {workdir / 'mosquitto.log'}", "user root"]
    client_args: list[str] = []
    if tls:
        cert, key = self_signed_cert(workdir)
        lines += [f"certfile {cert}", f"keyfile {key}"]
        client_args = ["--ca", cert]
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return Server([binary, "-c", str(conf)], port, workdir / "mosquitto.log", client_args=client_args)


def prepare_prosody(workdir: Path) -> Server:
    from .peers import xmpp

    xmpp._client_class()  # PeerUnavailable when slixmpp is missing
    prosody, prosodyctl = which("prosody"), which("prosodyctl")
    cert, key = self_signed_cert(workdir)
    (workdir / "data").mkdir(exist_ok=True)
    conf = xmpp._config(workdir, PORTS["xmpp-tls"], cert, key, interface=GATEWAY_ADDR)
    for user, password in xmpp.PASSWORDS.items():
        _run([prosodyctl, "--config", str(conf), "register", user, content.DOMAIN, password],
             f"prosodyctl register {user}")
    return Server([prosody, "--config", str(conf), "-F"], PORTS["xmpp-tls"], workdir / "prosody.log",
                  client_args=["--ca", cert])


def prepare(system: str, workdir: Path, profile: LinkProfile) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    if system == OURS:
        return prepare_ours(workdir, profile)
    if system in ("mqtt", "mqtt-tls"):
        return prepare_mosquitto(workdir, tls=system == "mqtt-tls")
    return prepare_prosody(workdir)


async def _port_open_in_gateway_ns(link: PacketLink, port: int) -> bool:
    loop = asyncio.get_running_loop()
    with link.socket("gateway", socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            await asyncio.wait_for(loop.sock_connect(probe, (link.gateway_addr, port)), 1.0)
            return True
        except (OSError, TimeoutError):
            return False


async def start_server(link: PacketLink, server: Server, timeout: float = 30.0) -> asyncio.subprocess.Process:
    """Start ``server`` in the gateway namespace and wait until it serves (bounded)."""
    loop = asyncio.get_running_loop()
    with open(server.log, "ab") as log:
        stdout = subprocess.PIPE if server.ready_line else log
        process = await link.run_in("gateway", server.argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=log,
                                    cwd=ROOT)
    deadline = loop.time() + timeout
    if server.ready_line:
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if server.ready_line not in line.decode(errors="replace"):
            raise PeerUnavailable(f"server did not start ({line.decode(errors='replace').strip()!r}): "
                                  f"{_tail(server.log)}")
        return process
    while loop.time() < deadline:
        if process.returncode is not None:
            raise PeerUnavailable(f"server exited {process.returncode}: {_tail(server.log)}")
        if await _port_open_in_gateway_ns(link, server.port):
            return process
        await asyncio.sleep(0.1)
    raise PeerUnavailable(f"server did not open tcp/{server.port} within {timeout:g} s: {_tail(server.log)}")


# ---------------------------------------------------------------------------
# Link counters per phase


def _activity(counters: PacketDuplexCounters) -> tuple[int, int, int]:
    return (counters.uplink.offered_packets, counters.downlink.offered_packets,
            counters.uplink.in_flight + counters.downlink.in_flight)


async def settle(link: PacketLink, timing: Timing) -> bool:
    """Wait until no packet was offered for ``quiet_s`` and none is in flight (at most ``settle_limit_s``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timing.settle_limit_s
    last = _activity(link.counters)
    quiet_since = loop.time()
    while loop.time() < end:
        await asyncio.sleep(0.05)
        now = _activity(link.counters)
        if now != last:
            last, quiet_since = now, loop.time()
        elif now[2] == 0 and loop.time() - quiet_since >= timing.quiet_s:
            return True
    return False


def _direction_delta(after: PacketCounters, before: PacketCounters) -> dict[str, int]:
    return {
        "packets": after.offered_packets - before.offered_packets,
        "bytes": after.offered_bytes - before.offered_bytes,
        "delivered_packets": after.delivered_packets - before.delivered_packets,
        "dropped_packets": after.dropped_total - before.dropped_total,
        "duplicated_packets": after.duplicated_packets - before.duplicated_packets,
    }


def link_delta(after: PacketDuplexCounters, before: PacketDuplexCounters) -> dict[str, Any]:
    up = _direction_delta(after.uplink, before.uplink)
    down = _direction_delta(after.downlink, before.downlink)
    return {"bytes_up": up["bytes"], "bytes_down": down["bytes"], "packets_up": up["packets"],
            "packets_down": down["packets"], "bytes": up["bytes"] + down["bytes"], "uplink": up, "downlink": down}


def _add_links(*parts: dict[str, Any]) -> dict[str, Any]:
    keys = ("bytes_up", "bytes_down", "packets_up", "packets_down", "bytes")
    return {key: sum(part[key] for part in parts) for key in keys}


# ---------------------------------------------------------------------------
# One system


class SystemFailed(Exception):
    """A system's run broke off (client or server died, budget exhausted); the message says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Marks:
    """Link counters when each phase began, and at the end."""

    at: list[tuple[str, PacketDuplexCounters, bool]] = field(default_factory=list)  # (phase, counters, settled)

    def per_phase(self, end: PacketDuplexCounters) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for n, (phase, counters, settled) in enumerate(self.at):
            following = self.at[n + 1][1] if n + 1 < len(self.at) else end
            out[phase] = {**link_delta(following, counters), "settled_before": settled}
        return out


async def drive_client(link: PacketLink, system: str, server: Server, args: argparse.Namespace, timing: Timing,
                       log: Path, marks: Marks, server_process: asyncio.subprocess.Process) -> dict[str, Any]:
    """Run the client process in the device namespace through its phases; its result."""
    loop = asyncio.get_running_loop()
    argv = [sys.executable, "-m", "benchmarks.link_client", system, "--server", link.gateway_addr,
            "--port", str(server.port), "--count", str(args.count), "--window", str(args.window),
            "--item-timeout", str(timing.item_timeout), "--setup-timeout", str(timing.setup_timeout),
            "--give-up-after", str(timing.give_up_after), "--refresh", str(timing.refresh),
            "--grace", str(timing.grace),
            "--handshake-timeout", str(timing.settle_limit_s + 60), *server.client_args]
    with open(log, "ab") as err:
        client = await link.run_in("device", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                   cwd=ROOT)
    assert client.stdout is not None and client.stdin is not None
    deadline = loop.time() + (args.system_timeout or timing.system_budget(args.count, args.window))
    server_gone = asyncio.ensure_future(server_process.wait())
    result: dict[str, Any] | None = None
    try:
        while result is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SystemFailed(f"client did not finish within its budget; log: {_tail(log)}")
            reading = asyncio.ensure_future(client.stdout.readline())
            done, _ = await asyncio.wait({reading, server_gone}, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            if reading not in done:
                reading.cancel()
                if server_gone in done:
                    raise SystemFailed(f"server exited ({server_process.returncode}) during the run: "
                                       f"{_tail(server.log)}")
                continue
            line = reading.result()
            if not line:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.wait(), 10)
                raise SystemFailed(f"client exited ({client.returncode}) without a result: {_tail(log)}")
            try:
                event = json.loads(line)
            except ValueError:
                progress(f"{system}: client said {line.decode(errors='replace').strip()[:200]}")
                continue
            if "phase" in event:
                settled = await settle(link, timing)
                marks.at.append((event["phase"], link.counters, settled))
                progress(f"{system}: phase {event['phase']}" + ("" if settled else " (link not quiet)"))
                client.stdin.write(b"go\n")
                await client.stdin.drain()
            elif "progress" in event:
                if event["done"] == event["of"] or event["done"] % 50 == 0:
                    progress(f"{system}: {event['progress']} {event['done']}/{event['of']}")
            elif "result" in event:
                result = event["result"]
        try:
            await asyncio.wait_for(client.wait(), 15)
        except TimeoutError:
            client.kill()
        return result
    finally:
        server_gone.cancel()
        if client.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                client.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.wait(), 5)


def kind_figures(tally: dict[str, Any], link: dict[str, Any] | None) -> dict[str, Any]:
    latencies = tally["latencies_s"]
    count = tally["count"]
    return {
        "count": count,
        "sent": tally["sent"],
        "received": tally["received"],
        "delivery_ratio": round(tally["received"] / count, 4) if count else None,
        "duplicates": tally["duplicates"],
        "late": tally["late"],
        "gave_up": tally["gave_up"],
        "send_errors": tally["send_errors"],
        "send_error_examples": tally["send_error_examples"],
        "stopped_early": tally["stopped_early"],
        "total_s": tally["total_s"],
        "latency_s": {**percentiles(latencies), "mean": round(sum(latencies) / len(latencies), 4) if latencies
                      else None},
        "link": link,
        "latencies_s": latencies,
    }


def system_figures(system: str, result: dict[str, Any], phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    kinds = {kind: kind_figures(result[kind], phases.get(kind)) for kind in KINDS}
    latencies = [*kinds["im"]["latencies_s"], *kinds["presence"]["latencies_s"]]
    totals = [kinds[kind]["total_s"] for kind in KINDS]
    count = sum(kinds[kind]["count"] for kind in KINDS)
    received = sum(kinds[kind]["received"] for kind in KINDS)
    measured = [phases[kind] for kind in KINDS if kind in phases]
    session = _add_links(*phases.values()) if phases else None
    return {
        "status": "ok" if result.get("error") is None else f"failed: {result['error']}",
        "what": DESCRIPTIONS[system],
        "total_s": round(sum(totals), 4) if all(t is not None for t in totals) else None,
        "latency_s": percentiles(latencies),
        "delivery_ratio": round(received / count, 4) if count else None,
        "duplicates": sum(kinds[kind]["duplicates"] for kind in KINDS),
        "link": _add_links(*measured) if len(measured) == len(KINDS) else None,
        "setup_link": phases.get("setup"),
        "session_link": session,
        "im": kinds["im"],
        "presence": kinds["presence"],
        "phases": phases,
        "info": result.get("info", {}),
        "client_wall_s": result.get("client_wall_s"),
    }


async def run_system(system: str, args: argparse.Namespace, profile: LinkProfile, timing: Timing,
                     workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    progress(f"{system}: preparing ({DESCRIPTIONS[system]})")
    try:
        server = await asyncio.to_thread(prepare, system, workdir / system, profile)
    except PeerUnavailable as exc:
        return {"status": f"unavailable: {exc}"}
    marks = Marks()
    phases: dict[str, dict[str, Any]] = {}
    try:
        async with PacketLink(profile, args.seed) as link:
            progress(f"{system}: link {link.device_ns} <-> {link.gateway_ns} up ({profile.name}, seed {args.seed})")
            try:
                server_process = await start_server(link, server)
            except PeerUnavailable as exc:
                return {"status": f"unavailable: {exc}"}
            result = await drive_client(link, system, server, args, timing, workdir / system / "client.log", marks,
                                        server_process)
            await settle(link, timing)
            phases = marks.per_phase(link.counters)
            link_counters = link.counters.as_dict()
    except SystemFailed as exc:
        return {"status": f"failed: {exc.reason}"}
    figures = system_figures(system, result, phases)
    if figures["status"] != "ok" and result["im"]["sent"] == 0:
        figures["status"] = f"unavailable: client setup failed: {result['error']}"
    figures["link_counters"] = link_counters
    figures["wall_clock_s"] = round(time.monotonic() - started, 2)
    progress(f"{system}: {figures['status']} ({figures['wall_clock_s']} s)")
    return figures


# ---------------------------------------------------------------------------
# Report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios_to(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, float | None]:
    def get(figures: dict[str, Any], *path: str) -> Any:
        value: Any = figures
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return {
        "total_s": _ratio(get(ours, "total_s"), get(other, "total_s")),
        "bytes": _ratio(get(ours, "link", "bytes"), get(other, "link", "bytes")),
        "bytes_up": _ratio(get(ours, "link", "bytes_up"), get(other, "link", "bytes_up")),
        "bytes_down": _ratio(get(ours, "link", "bytes_down"), get(other, "link", "bytes_down")),
        "packets": _ratio(_sum(get(ours, "link", "packets_up"), get(ours, "link", "packets_down")),
                          _sum(get(other, "link", "packets_up"), get(other, "link", "packets_down"))),
        "im_total_s": _ratio(get(ours, "im", "total_s"), get(other, "im", "total_s")),
        "presence_total_s": _ratio(get(ours, "presence", "total_s"), get(other, "presence", "total_s")),
        "latency_p50": _ratio(get(ours, "latency_s", "p50"), get(other, "latency_s", "p50")),
    }


def _sum(*values: int | None) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(rows: list[list[Any]], header: list[str]) -> str:
    return payload_table(rows, header, fmt=_fmt)


def print_tables(systems: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float | None]]) -> None:
    measured = {name: figures for name, figures in systems.items() if "im" in figures}
    rows = []
    for name, figures in measured.items():
        for kind in KINDS:
            k = figures[kind]
            link = k["link"] or {}
            rows.append([f"{name} {kind}", k["total_s"], k["latency_s"]["p50"], k["latency_s"]["p95"],
                         k["latency_s"]["p99"], k["delivery_ratio"], k["duplicates"], link.get("bytes_up"),
                         link.get("bytes_down"), link.get("packets_up"), link.get("packets_down")])
    if rows:
        print("Per phase (latency: send call to the receiver's application; bytes/packets: IP, on the emulated link)")
        print(table(rows, ["system phase", "total s", "p50 s", "p95 s", "p99 s", "delivered", "dups", "bytes up",
                           "bytes down", "pkts up", "pkts down"]))
        print()
        rows = [[name, f["total_s"], f["latency_s"]["p50"], f["latency_s"]["p95"], f["latency_s"]["p99"],
                 f["delivery_ratio"], f["duplicates"], (f["link"] or {}).get("bytes_up"),
                 (f["link"] or {}).get("bytes_down"), (f["setup_link"] or {}).get("bytes")]
                for name, f in measured.items()]
        print("Per system (IMs + presence changes; setup = connect, security handshake, subscribe)")
        print(table(rows, ["system", "total s", "p50 s", "p95 s", "p99 s", "delivered", "dups", "bytes up",
                           "bytes down", "setup bytes"]))
        print()
    if ratios:
        keys = ("total_s", "im_total_s", "presence_total_s", "bytes", "bytes_up", "bytes_down", "packets")
        print("Ratio ours / each (smaller is better)")
        print(table([[name, *(r[key] for key in keys)] for name, r in ratios.items()], ["vs", *keys]))
        print()
    for name, figures in systems.items():
        if figures["status"] != "ok":
            print(f"{name}: {figures['status']}")


def plot(systems: dict[str, dict[str, Any]], title: str, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG"
    names = [name for name, figures in systems.items() if "im" in figures]
    if not names:
        return "nothing measured: no PNG"
    fig, (ax_time, ax_latency, ax_bytes) = plt.subplots(1, 3, figsize=(15, 5))
    width = 0.38
    xs = range(len(names))
    for offset, kind in ((-width / 2, "im"), (width / 2, "presence")):
        totals = [systems[name][kind]["total_s"] or 0 for name in names]
        label = f"{kind} ({systems[names[0]][kind]['count']})"
        bars = ax_time.bar([x + offset for x in xs], totals, width, label=label)
        ax_time.bar_label(bars, fmt="%.3g", fontsize=8)
    ax_time.set_xticks(list(xs), names)
    ax_time.set_ylabel("seconds")
    ax_time.set_title("Total time")
    ax_time.legend(fontsize=8)

    data, labels, positions = [], [], []
    for n, name in enumerate(names):
        for k, kind in enumerate(KINDS):
            data.append(systems[name][kind]["latencies_s"] or [math.nan])
            labels.append(kind)
            positions.append(n * 2.5 + k)
    ax_latency.boxplot(data, positions=positions, whis=(5, 95), showfliers=True, widths=0.8)
    for position, values in zip(positions, data, strict=True):
        stats = percentiles(v for v in values if not math.isnan(v))
        if stats["p99"] is not None:
            ax_latency.plot(position, stats["p99"], marker="v", color="red", markersize=5)
    ax_latency.set_xticks(positions, labels, fontsize=7)
    for n, name in enumerate(names):
        ax_latency.text(n * 2.5 + 0.5, -0.09, name, transform=ax_latency.get_xaxis_transform(), ha="center",
                        fontsize=9)
    ax_latency.set_yscale("log")  # a few retransmission stalls are 10-100x the median
    ax_latency.set_ylabel("seconds, log scale (box: p25-p75, whiskers p5-p95, red: p99)")
    ax_latency.set_title("Latency per item")

    ups = [(systems[name]["link"] or {}).get("bytes_up", 0) for name in names]
    downs = [(systems[name]["link"] or {}).get("bytes_down", 0) for name in names]
    ax_bytes.bar(list(xs), ups, 0.6, label="uplink (device -> server)")
    bars = ax_bytes.bar(list(xs), downs, 0.6, bottom=ups, label="downlink")
    ax_bytes.bar_label(bars, labels=[f"{(u + d) / 1000:.1f} kB" for u, d in zip(ups, downs, strict=True)],
                       fontsize=8)
    ax_bytes.set_xticks(list(xs), names)
    ax_bytes.set_ylabel("IP bytes on the link (IMs + presence)")
    ax_bytes.set_title("Bytes on the link")
    ax_bytes.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def report(systems: dict[str, dict[str, Any]], args: argparse.Namespace, profile: LinkProfile, timing: Timing,
           wall_clock_s: float) -> dict[str, Any]:
    ratios = {name: ratios_to(systems[OURS], figures) for name, figures in systems.items()
              if name != OURS and OURS in systems and "im" in systems[OURS] and "im" in figures}
    print_tables(systems, ratios)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "link.png"
    title = (f"{args.count} IMs + {args.count} presence changes over the emulated '{profile.name}' link "
             f"(packet level, seed {args.seed}, window {args.window})")
    plot_problem = plot(systems, title, png)
    policy = {
        "window": args.window,
        "rule": "the sender keeps at most `window` items that the receiver's application has not yet got; an item "
                "leaves the window when it arrives, when the sender's protocol reports it failed, or after "
                "item_timeout_s (then counted lost; a later arrival counts, as late); until then senders keep "
                "trying (ours resends the same IM id / publish after a CoAP give-up, paho queues across "
                "reconnects of its persistent session, TCP retransmits); a phase stops after give_up_after "
                "losses in a row",
        "item_timeout_s": timing.item_timeout,
        "give_up_after": timing.give_up_after,
        "latency": "from the sender's send call to the receiver's application (one process, one clock)",
        "link_bytes": "IP packets and bytes offered to the link model (headers, retransmissions, pure ACKs), booked "
                      "to a phase after the link was quiet for quiet_s",
        "quiet_s": timing.quiet_s,
        "keepalive": "each session is kept alive its own way every refresh_s: ours polls an observation silent that "
                     "long (GET with the cursor / ETag) and registers again when a poll found news no notification "
                     "brought within grace_s; MQTT keepalive (PINGREQ when idle); XMPP a whitespace (slixmpp)",
        "refresh_s": timing.refresh,
        "grace_s": timing.grace,
    }
    common = {
        "benchmark": "link",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "profile": profile.name,
        "seed": args.seed,
        "count": args.count,
        "policy": policy,
        "wall_clock_s": round(wall_clock_s, 1),
    }
    detail = {**common, "profile_summary": profile.summary, "systems": systems, "ratios_ours_to": ratios,
              "png": None if plot_problem else str(png)}
    (args.out / "link.json").write_text(json.dumps(detail, indent=1, ensure_ascii=False))
    headline_keys = ("status", "total_s", "delivery_ratio", "duplicates")
    summary_systems: dict[str, Any] = {}
    for name, figures in systems.items():
        entry = {key: figures.get(key) for key in headline_keys}
        if "im" in figures:
            entry["latency_s"] = {p: figures["latency_s"][p] for p in ("p50", "p95", "p99")}
            entry["link"] = {k: (figures["link"] or {}).get(k) for k in ("bytes_up", "bytes_down", "packets_up",
                                                                          "packets_down")}
            for kind in KINDS:
                k = figures[kind]
                entry[kind] = {"total_s": k["total_s"], "delivery_ratio": k["delivery_ratio"],
                               "duplicates": k["duplicates"],
                               "latency_s": {p: k["latency_s"][p] for p in ("p50", "p95", "p99")},
                               "bytes_up": (k["link"] or {}).get("bytes_up"),
                               "bytes_down": (k["link"] or {}).get("bytes_down")}
        summary_systems[name] = entry
    if plot_problem:
        print(f"note: {plot_problem}")
    return {**common, "policy": {"window": args.window, "item_timeout_s": timing.item_timeout},
            "systems": summary_systems, "ratios_ours_to": ratios, "json": str(args.out / "link.json"),
            "png": None if plot_problem else str(png)}


# ---------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, profile: LinkProfile, timing: Timing) -> dict[str, dict[str, Any]]:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM like Ctrl-C: cancel, so every PacketLink closes and its processes end
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    systems: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
        for system in args.systems:
            try:
                systems[system] = await run_system(system, args, profile, timing, Path(tmp))
            except Exception as exc:  # one system's surprise must not lose the others' figures
                import traceback

                traceback.print_exc(file=sys.stderr)
                systems[system] = {"status": f"failed: {type(exc).__name__}: {exc}"}
                progress(f"{system}: {systems[system]['status']}")
    return systems


def _systems(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown systems {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks link", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="gprs", choices=profile_names(), help="link profile, default gprs")
    p.add_argument("--count", type=_positive, default=100, help="IMs, and presence changes, per system (100)")
    p.add_argument("--seed", type=int, default=1, help="seed of the link models, default 1")
    p.add_argument("--systems", type=_systems, default=list(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--window", type=_positive, default=1, help="items the sender may have out (default 1)")
    p.add_argument("--item-timeout", type=float, help="seconds before an item counts as lost "
                   "(default: the profile's CoAP MAX_TRANSMIT_WAIT)")
    p.add_argument("--give-up-after", type=_positive, default=5, help="stop a phase after this many losses in a row")
    p.add_argument("--refresh", type=float, default=30.0, help="keep-alive period of an idle session, every system "
                   "(ours: poll an observation silent this long; MQTT keepalive; XMPP whitespace), default 30")
    p.add_argument("--system-timeout", type=float, help="seconds one system's client may take "
                   "(default: the sum of all its bounded waits)")
    p.add_argument("--out", type=Path, default=Path("var/bench"), help="directory for link.json/.png (var/bench)")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reason = packet_link_unavailable(probe=True)
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    profile = get_profile(args.profile)
    timing = Timing.of(profile, args.item_timeout, args.give_up_after, args.refresh)
    started = time.monotonic()
    try:
        systems = asyncio.run(run_all(args, profile, timing))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: links, namespaces and processes were cleaned up", file=sys.stderr)
        return 130
    summary = report(systems, args, profile, timing, time.monotonic() - started)
    print(json.dumps(summary, ensure_ascii=False, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
