"""The fleet simulator end to end: real gateway, OSCORE, UDP on loopback through seeded link relays.

Time is scaled so the file stays fast: CoAP ACK_TIMEOUT 0.1 s instead of 2-3 s, a 2 s
outage standing in for a 2-minute one, presence leases of 2-4 s instead of minutes, the
gateway sweeping leases every 50 ms, devices polling what they observe every 0.5 s.
Ratios between these times (outage >> ACK_TIMEOUT, lease >> sweep) are what matter.

Each test is seeded (``FLEET_SEED``, default below); the seed is printed and named in
every assertion so a failure can be replayed. A seed fixes the links' random numbers,
the plan and the traffic, not the interleaving of real sockets, so replays are close,
not identical.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.fleet import Fleet, FleetConfig, Tuning, fleet_on_local_gateway
from device_sim.link import DropCause, LinkParams
from device_sim.profiles import LinkProfile, get_profile
from device_sim.report import Recorder
from device_sim.scenarios import DeviceSpec, Role, plan_fleet

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SEED = 20240611

# Loopback with a little latency: the baseline the scaled scenarios run on.
QUICK = LinkParams(latency_s=0.005, jitter_s=0.002)
QUICK_PROFILE = LinkProfile("quick", "loopback, 5 ms each way", QUICK, QUICK, ack_timeout=0.1, max_retransmit=4)
# Aggressive but valid: ACK_TIMEOUT 0.1 s is well above the ~10 ms round trip (RFC 7252 4.8).
FAST = Tuning(ack_timeout=0.1, max_retransmit=4, request_timeout=5.0)


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("FLEET_SEED", DEFAULT_SEED))
    print(f"FLEET_SEED={value}")
    return value


def accepted_ims(recorder: Recorder) -> list[tuple[str, bytes]]:
    return [key for key, sent in recorder.sent.items() if sent.accepted_at is not None]


def assert_exactly_once(recorder: Recorder, seed: int) -> None:
    for key in accepted_ims(recorder):
        sent = recorder.sent[key]
        times = recorder.received.get(key, [])
        assert len(times) == 1, (
            f"seed={seed}: IM {key[1].hex()} {sent.sender} -> {sent.recipient} (seq {sent.seq}) "
            f"handed to the application {len(times)} times"
        )
    assert recorder.duplicates() == 0, f"seed={seed}"
    assert recorder.unexpected_receipts == 0, f"seed={seed}"


async def test_acknowledged_ims_arrive_exactly_once_at_30_percent_loss(tmp_path: Path, seed: int) -> None:
    """30 % loss each way and MAX_RETRANSMIT 1: a quarter of all exchanges fail, so IMs
    are resent (same id, same bytes) after a lost request *or* a lost 2.01, and the
    gateway must store each once; the recipient must hand each over once."""
    lossy = LinkParams(loss=0.3, latency_s=0.005, jitter_s=0.002)
    profile = LinkProfile("loss30", "30 % loss each way", lossy, lossy, ack_timeout=0.1, max_retransmit=1)
    tuning = Tuning(ack_timeout=0.1, max_retransmit=1, request_timeout=2.0)
    times = tuple(0.2 + 0.15 * k for k in range(8))
    names = ["a", "b", "c", "d", "e", "f"]
    specs = [
        DeviceSpec(name, Role.CHAT, partner=names[i ^ 1], publishes=False, im_times=times)
        for i, name in enumerate(names)
    ]
    config = FleetConfig(
        profile, duration=20.0, seed=seed, tuning=tuning, refresh=0.5, grace=1.0, drain=20.0, start_spread=0.1
    )
    async with fleet_on_local_gateway(config, specs, tmp_path, sweep_interval=0.05) as (fleet, _gateway):
        result = await asyncio.wait_for(fleet.run(), 45)
    recorder = fleet.recorder
    assert len(recorder.sent) == len(names) * len(times), f"seed={seed}"
    assert len(accepted_ims(recorder)) == len(recorder.sent), f"seed={seed}: {result['im']}"
    assert_exactly_once(recorder, seed)
    assert result["im"]["duplicates_seen_by_applications"] == 0, f"seed={seed}"
    assert result["im"]["resends"] > 0, f"seed={seed}: no IM was resent; the loss did not bite"
    for direction in ("up", "down"):
        air = result["air"][direction]
        assert air["lost_datagrams"] > 0 and air["retransmissions"] > 0, f"seed={seed}: {direction} {air}"


async def test_ims_sent_during_an_outage_arrive_after_it(tmp_path: Path, seed: int) -> None:
    """b's link is down from 1 s to 3 s (standing in for 2 minutes); a sends to it
    meanwhile: the gateway accepts them, b gets each once after the link returns."""
    outage = (1.0, 3.0)
    specs = [
        DeviceSpec("a", Role.CHAT, partner="b", publishes=False, im_times=(0.4, 1.3, 1.8, 2.3)),
        DeviceSpec("b", Role.CHAT, partner="a", publishes=False, im_times=(), outages=(outage,)),
    ]
    config = FleetConfig(
        QUICK_PROFILE, duration=10.0, seed=seed, tuning=FAST, refresh=0.5, grace=1.0, drain=15.0, start_spread=0.05
    )
    async with fleet_on_local_gateway(config, specs, tmp_path, sweep_interval=0.05) as (fleet, _gateway):
        await asyncio.wait_for(fleet.run(), 30)
        b_links = fleet.by_name["b"].relay.device_counters(fleet.by_name["b"].relay.devices[0])
    recorder = fleet.recorder
    assert_exactly_once(recorder, seed)
    during = [s for s in recorder.sent.values() if s.accepted_at is not None and outage[0] < s.accepted_at < outage[1]]
    assert len(during) == 3, f"seed={seed}: accepted during the outage: {len(during)}"
    for sent in during:
        [arrived] = recorder.received[(sent.sender, sent.msg_id)]
        assert outage[1] <= arrived <= outage[1] + 6.0, f"seed={seed}: seq {sent.seq} arrived at {arrived:.2f} s"
    dropped = b_links.uplink.dropped_datagrams[DropCause.OUTAGE] + b_links.downlink.dropped_datagrams[DropCause.OUTAGE]
    assert dropped > 0, f"seed={seed}: nothing hit the outage"


async def test_vanished_device_is_out_of_contact_for_its_watchers_within_its_lease(
    tmp_path: Path, seed: int
) -> None:
    """v publishes with a 2 s lease and keeps it alive, then vanishes at 1 s without a
    goodbye; both watchers must see it out of contact within the lease (plus the 50 ms
    sweep and a notification's trip)."""
    lease = 2
    specs = [
        DeviceSpec("v", Role.VANISH, vanish_at=1.0),
        DeviceSpec("w1", Role.CHAT, publishes=False, watches=("v",)),
        DeviceSpec("w2", Role.CHAT, publishes=False, watches=("v",)),
    ]
    config = FleetConfig(
        QUICK_PROFILE, duration=6.0, seed=seed, tuning=FAST, lease=lease, refresh=0.5, grace=1.0, drain=6.0,
        start_spread=0.05,
    )
    async with fleet_on_local_gateway(config, specs, tmp_path, sweep_interval=0.05) as (fleet, _gateway):
        result = await asyncio.wait_for(fleet.run(), 20)
    detections = result["out_of_contact"]["detections"]
    assert len(detections) == 2, f"seed={seed}: {detections}"
    for detection in detections:
        after = detection["detected_after_s"]
        assert after is not None, f"seed={seed}: {detection['watcher']} never saw v out of contact"
        assert 0.0 < after <= lease + 0.3, f"seed={seed}: {detection['watcher']} saw it after {after} s"
    assert result["presence"]["out_of_contact_not_vanished"] == 0, f"seed={seed}"
    assert result["presence"]["seen_by_watchers"] > 0, f"seed={seed}: the watchers never saw v in contact"


async def test_nat_rebinding_keeps_oscore_and_the_inbox_working(tmp_path: Path, seed: int) -> None:
    """Both devices get a new NAT port at 1 s. Their OSCORE requests keep working from
    the new port; the gateway's notifications for b still go to the old one, so b finds
    a message by polling, registers its inbox observation again, and everything sent
    before and after the rebinding reaches b once."""
    rebind_at = 1.0
    specs = [
        DeviceSpec("a", Role.CHAT, partner="b", publishes=False, im_times=(0.5, 1.6, 2.2, 4.5, 5.0)),
        DeviceSpec("b", Role.CHAT, partner="a", im_times=()),
    ]
    config = FleetConfig(
        QUICK_PROFILE, duration=8.0, seed=seed, tuning=FAST, lease=4, keepalive=0.5, refresh=0.5, grace=1.0,
        drain=8.0, start_spread=0.05,
    )

    async def rebind(fleet: Fleet) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        await asyncio.sleep(rebind_at)
        relay = fleet.by_name["b"].relay
        before = relay.upstream_address(relay.devices[0])
        fleet.rebind("a")
        fleet.rebind("b")
        await asyncio.sleep(0.05)
        return before, relay.upstream_address(relay.devices[0])

    async with fleet_on_local_gateway(config, specs, tmp_path, sweep_interval=0.05) as (fleet, _gateway):
        running = asyncio.create_task(fleet.run())
        old_port, new_port = await rebind(fleet)
        await asyncio.wait_for(running, 25)
        rebinds = fleet.by_name["b"].relay.stats.rebinds
    recorder = fleet.recorder
    assert rebinds == 1 and old_port != new_port, f"seed={seed}: {old_port} -> {new_port}"
    assert_exactly_once(recorder, seed)
    assert len(accepted_ims(recorder)) == 5, f"seed={seed}"
    b = fleet.user_of("b")
    later_publishes = [p for p in recorder.publishes.values() if p.presentity == b and p.started > rebind_at + 0.1]
    assert later_publishes and all(p.accepted_at is not None for p in later_publishes[:-1]), (
        f"seed={seed}: b's publishes after the rebinding failed"
    )
    established = recorder.observations_established.get(b, [])
    assert any(t > rebind_at for t in established), f"seed={seed}: b's inbox observation was not re-registered"
    for sent in recorder.sent.values():
        [arrived] = recorder.received[(sent.sender, sent.msg_id)]
        assert sent.accepted_at is not None
        assert arrived - sent.accepted_at < 3.0, f"seed={seed}: seq {sent.seq} took {arrived - sent.accepted_at:.2f} s"


def test_plan_mix() -> None:
    specs = plan_fleet(20, duration=30)
    roles = [s.role for s in specs]
    assert (roles.count(Role.CHAT), roles.count(Role.CHURN), roles.count(Role.SLEEPY), roles.count(Role.VANISH)) == (
        12, 4, 2, 2
    )
    names = {s.name for s in specs}
    for spec in specs:
        assert {*spec.watches, *spec.sleepy_targets, *([spec.partner] if spec.partner else [])} <= names
    watched = {w for s in specs for w in s.watches}
    assert all(s.name in watched for s in specs if s.role in (Role.VANISH, Role.CHURN))
    assert get_profile("gprs").ack_timeout == FleetConfig(get_profile("gprs"), 30).device_tuning().ack_timeout


def test_cli_run_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "device_sim", "run", "--devices", "4", "--profile", "lan", "--duration", "3",
            "--seed", "3", "--im-interval", "0.5", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 4 and summary["profile"] == "lan" and summary["seed"] == 3
    assert summary["duplicates"] == 0
    assert summary["im_sent"] > 0 and summary["delivery_ratio"] == 1.0, summary
    assert summary["out_of_contact_missed"] == 0, summary
    for key in ("im_latency_s", "presence_latency_s", "up", "down", "per_operation_wire_bytes"):
        assert key in summary
    png = Path(summary["plot"])
    assert png.exists() and png.read_bytes().startswith(b"\x89PNG")
    result = json.loads(Path(summary["result"]).read_text())
    assert result["im"]["delivered_exactly_once"] == result["im"]["accepted"]
