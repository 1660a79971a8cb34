"""Packet-level link emulation (device_sim.tun): real IP packets between two network namespaces.

Needs root, ``ip netns`` and ``/dev/net/tun``; skipped otherwise (the pure helpers are
tested everywhere). Only the namespaces these tests create carry traffic; the root
namespace's interfaces and routes are never touched.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from device_sim.link import DropCause, LinkModel, LinkParams, derive_seed
from device_sim.tun import (
    NETNS_PREFIX,
    PacketLink,
    model_size,
    packet_link_unavailable,
    sweep_stale_namespaces,
)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

TCP_ECHO = """
import asyncio, sys
async def handle(reader, writer):
    data = await reader.read()  # until the client's FIN
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

COAP_GET = """
import asyncio, sys, aiocoap
async def main():
    ctx = await aiocoap.Context.create_client_context()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        request = aiocoap.Message(code=aiocoap.GET, uri=sys.argv[1])
        response = await asyncio.wait_for(ctx.request(request).response, float(sys.argv[2]))
        print(response.code.dotted, round(loop.time() - started, 3), len(response.payload), flush=True)
        print(response.payload.decode(errors="replace"), flush=True)
    finally:
        await ctx.shutdown()
asyncio.run(main())
"""


@functools.cache
def _unavailable() -> str | None:
    return packet_link_unavailable(probe=True)


@pytest.fixture
def netns_ok() -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason if reason.startswith("packet-level mode") else f"packet-level mode: {reason}")


def _netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


async def _start_server(link: PacketLink, argv: Sequence[str], ready: str, timeout: float = 20.0,
                        stderr: Any = subprocess.DEVNULL) -> asyncio.subprocess.Process:
    process = await link.run_in(link.gateway_ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, cwd=ROOT)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    assert ready in line.decode(), f"server did not start: {line!r}"
    return process


async def _udp_exchange(sock: socket.socket, payload: bytes, peer: tuple[str, int], timeout: float) -> float:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await loop.sock_sendto(sock, payload, peer)
    data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), timeout)
    assert data == payload
    return time.monotonic() - started


# -- pure helpers: no privileges needed ----------------------------------------------------------


def test_model_size_is_the_udp_payload_equivalent() -> None:
    assert model_size(bytes([0x45]) + bytes(1499)) == 1472  # IPv4: a full Ethernet frame's UDP payload
    assert model_size(bytes([0x60]) + bytes(1279)) == 1232  # IPv6 minimum MTU
    assert model_size(bytes([0x45]) + bytes(10)) == 0
    assert model_size(b"") == 0


def test_names_addresses_and_mtus_without_starting() -> None:
    link = PacketLink("lora-sf12", seed=1)
    assert link.device_ns.startswith(f"{NETNS_PREFIX}-dev-") and link.gateway_ns.startswith(f"{NETNS_PREFIX}-gw-")
    assert link.device_ns.split("-", 2)[2] == link.gateway_ns.split("-", 2)[2]  # one run, one suffix
    assert (link.device_addr, link.gateway_addr) == ("10.213.0.1", "10.213.0.2")
    assert link.interface_mtus == (79, 79)  # 51-byte frames + IPv4/UDP headers
    assert PacketLink("lan").interface_mtus == (1500, 1500)
    assert PacketLink(LinkParams()).interface_mtus == (1500, 1500)  # no model MTU: Ethernet's
    assert PacketLink(LinkParams(), interface_mtu=9000).interface_mtus == (9000, 9000)
    assert PacketLink((LinkParams(mtu=1232), LinkParams(mtu=300))).interface_mtus == (1260, 328)
    assert link.exec_argv("device", ["true"]) == ["ip", "netns", "exec", link.device_ns, "true"]
    with pytest.raises(ValueError):
        link.exec_argv("impp-somebody-else", ["true"])
    with pytest.raises(ValueError):
        PacketLink("lan", gateway_addr="192.0.2.1")  # not in the device's /30
    with pytest.raises(ValueError):
        PacketLink("lan", device_addr="8.8.8.8", gateway_addr="8.8.8.9")  # not private


def test_without_root_the_reason_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = packet_link_unavailable()
    assert reason is not None and reason.startswith("packet-level mode needs root")


# -- through real namespaces ----------------------------------------------------------------------


async def test_udp_echo_through_lan_link(netns_ok: None) -> None:
    async with PacketLink("lan", seed=1) as link:
        assert {link.device_ns, link.gateway_ns} <= _netns_names()
        await _start_server(link, [PYTHON, "-c", UDP_ECHO, link.gateway_addr, "7007"], "ready")
        sizes = [1, 100, 512, 1024, 1472]
        with link.socket(link.device_ns) as sock:
            rtts = [await _udp_exchange(sock, bytes([i]) * size, (link.gateway_addr, 7007), 5.0)
                    for i, size in enumerate(sizes)]
        counters = link.counters
    print(f"\nlan UDP echo: {len(sizes)} exchanges, RTT min {min(rtts) * 1e3:.2f} ms max {max(rtts) * 1e3:.2f} ms")
    for direction in (counters.uplink, counters.downlink):
        assert direction.offered_packets == len(sizes)  # nothing else crosses the link
        assert direction.offered_bytes == sum(sizes) + 28 * len(sizes)  # IP bytes
        assert direction.delivered_packets == len(sizes) and direction.dropped_total == 0


async def test_tcp_transfer_is_intact_through_a_lossy_link(netns_ok: None) -> None:
    lossy = LinkParams(loss=0.05, latency_s=0.005, jitter_s=0.002, mtu=1472)  # 1500-byte IP packets
    payload = random.Random(200).randbytes(200_000)
    async with PacketLink(lossy, seed=7) as link:
        await _start_server(link, [PYTHON, "-c", TCP_ECHO, link.gateway_addr, "7008"], "ready")
        loop = asyncio.get_running_loop()
        sock = link.socket(link.device_ns, socket.AF_INET, socket.SOCK_STREAM)
        started = time.monotonic()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (link.gateway_addr, 7008)), 10)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            echoed = await asyncio.wait_for(reader.read(), 25)
        finally:
            writer.close()
            await writer.wait_closed()
        elapsed = time.monotonic() - started
        counters = link.counters
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    up, down = counters.uplink, counters.downlink
    print(f"\nTCP 200 KB each way over 5 % loss each way: {elapsed:.2f} s; "
          f"uplink {up.offered_packets} packets, {up.dropped_packets[DropCause.LOSS]} lost ({up.drop_rate:.1%}); "
          f"downlink {down.offered_packets} packets, {down.dropped_packets[DropCause.LOSS]} lost "
          f"({down.drop_rate:.1%})")
    for direction in (up, down):
        assert direction.dropped_packets[DropCause.LOSS] > 0
        assert direction.dropped_total == direction.dropped_packets[DropCause.LOSS]
        assert direction.offered_bytes > len(payload)  # data, headers and retransmissions
        assert (direction.offered_packets + direction.duplicated_packets == direction.delivered_packets
                + direction.dropped_total + direction.write_errors + direction.in_flight)


async def test_latency_makes_the_round_trip_at_least_twice_the_one_way_delay(netns_ok: None) -> None:
    async with PacketLink(LinkParams(latency_s=0.1), seed=1) as link:
        await _start_server(link, [PYTHON, "-c", UDP_ECHO, link.gateway_addr, "7009"], "ready")
        with link.socket("device") as sock:
            rtts = [await _udp_exchange(sock, b"ping %d" % i, (link.gateway_addr, 7009), 5.0) for i in range(5)]
    print(f"\n100 ms each way: UDP RTT min {min(rtts) * 1e3:.1f} ms, max {max(rtts) * 1e3:.1f} ms")
    assert min(rtts) >= 0.2
    assert max(rtts) < 0.5


async def _received_one_way(seed: int, params: LinkParams, count: int, size: int) -> tuple[set[int], int]:
    """Send ``count`` numbered datagrams device -> gateway; which arrived, and how many were offered."""
    async with PacketLink((params, LinkParams()), seed=seed) as link:
        loop = asyncio.get_running_loop()
        with link.socket("gateway") as receiver, link.socket("device") as sender:
            receiver.bind((link.gateway_addr, 7010))
            for i in range(count):
                await loop.sock_sendto(sender, i.to_bytes(4, "big") + bytes(size - 4), (link.gateway_addr, 7010))
                await asyncio.sleep(0.002)
            received: set[int] = set()
            deadline = loop.time() + 0.5
            while loop.time() < deadline:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(receiver, 65535), deadline - loop.time())
                except TimeoutError:
                    break
                received.add(int.from_bytes(data[:4], "big"))
        return received, link.counters.uplink.offered_packets


async def test_model_decisions_replay_with_the_seed(netns_ok: None) -> None:
    params = LinkParams(loss=0.3)
    count, size = 40, 64
    first, offered = await _received_one_way(11, params, count, size)
    again, _ = await _received_one_way(11, params, count, size)
    other, _ = await _received_one_way(12, params, count, size)
    # The decisions a bare LinkModel makes with the uplink's seed: each datagram is offered with
    # its UDP payload size (IP length - 28), and time does not matter without bandwidth or outages.
    model = LinkModel(params, derive_seed(11, "uplink"))
    predicted = {i for i in range(count) if model.submit(float(i), size)}
    print(f"\nloss 30 %, seed 11: {count - len(first)}/{count} datagrams lost; seed 12: {count - len(other)} lost")
    assert offered == count
    assert first == again == predicted
    assert first != other
    assert 0 < len(first) < count


async def test_namespaces_and_processes_are_gone_after_the_block(netns_ok: None) -> None:
    async with PacketLink("lan", seed=1) as link:
        names = {link.device_ns, link.gateway_ns}
        assert names <= _netns_names()
    assert not names & _netns_names()
    assert not any(os.path.exists(f"/run/netns/{name}") for name in names)

    with pytest.raises(RuntimeError, match="boom"):
        async with PacketLink("gprs", seed=1) as link:
            names = {link.device_ns, link.gateway_ns}
            sleeper = await link.run_in("gateway", ["sleep", "60"])
            raise RuntimeError("boom")
    assert not names & _netns_names()
    assert sleeper.returncode is not None  # terminated with the link


def test_stale_namespaces_of_dead_runs_are_swept(netns_ok: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{NETNS_PREFIX}-dev-{dead.pid:x}-0badc0de"
    alive = f"{NETNS_PREFIX}-gw-{os.getpid():x}-0badc0de"
    foreign = f"{NETNS_PREFIX}-other-{secrets.token_hex(4)}"
    for name in (stale, alive, foreign):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        swept = sweep_stale_namespaces()
        assert stale in swept
        remaining = _netns_names()
        assert stale not in remaining
        assert alive in remaining and foreign in remaining
    finally:
        for name in (stale, alive, foreign):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


async def test_coap_get_through_a_gprs_link(netns_ok: None, tmp_path: Path) -> None:
    async with PacketLink("gprs", seed=3) as link:
        with open(tmp_path / "gateway.log", "wb") as log:
            await _start_server(
                link,
                [PYTHON, "-m", "gateway", "serve", "--bind", f"{link.gateway_addr}:5683", "--no-oscore",
                 "--store", f"sqlite:{tmp_path / 'gw.db'}"],
                "gateway ready", stderr=log,
            )
        client = await link.run_in(
            link.device_ns,
            [PYTHON, "-c", COAP_GET, f"coap://{link.gateway_addr}/.well-known/core", "25"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )
        out, err = await asyncio.wait_for(client.communicate(), 30)
        counters = link.counters
    lines = out.decode().splitlines()
    assert client.returncode == 0 and lines, f"client failed: {err.decode()[-2000:]}"
    code, seconds, length = lines[0].split()
    print(f"\nCoAP GET /.well-known/core over gprs: {code} in {seconds} s, {length} bytes; "
          f"uplink {counters.uplink.offered_packets} packets, downlink {counters.downlink.offered_packets}")
    assert code == "2.05"
    assert "</" in lines[1]  # a link-format document
    assert counters.uplink.delivered_packets >= 1 and counters.downlink.delivered_packets >= 1


def test_tun_subcommand(netns_ok: None) -> None:
    client = f"{PYTHON} -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); " \
             "[s.sendto(b\"x\", (\"10.213.0.2\", 9)) for _ in range(3)]'"
    done = subprocess.run([PYTHON, "-m", "device_sim", "tun", "--profile", "lan", "--device-cmd", client],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    first, last = (json.loads(line) for line in (done.stdout.splitlines()[0], done.stdout.splitlines()[-1]))
    assert first["device_addr"] == "10.213.0.1" and first["device_ns"].startswith(f"{NETNS_PREFIX}-dev-")
    assert last["counters"]["uplink"]["offered_packets"] == 3
    assert first["device_ns"] not in _netns_names()
