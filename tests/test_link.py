"""The link emulator: the seeded model by hand-driven time, then real UDP on loopback.

Statistical checks use fixed seeds and bounds of about five standard
deviations, and name the seed in the failure message so it can be replayed.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.link import (
    Address,
    DropCause,
    DuplexLinkModel,
    LinkModel,
    LinkParams,
    NatParams,
    UdpLinkRelay,
    derive_seed,
)
from device_sim.profiles import PROFILES, get_profile

SEEDS = (1, 2, 3)


def run(model: LinkModel, times: Sequence[float], size: int = 100) -> list[list[float]]:
    return [model.submit(t, size) for t in times]


def loss_pattern(model: LinkModel, count: int) -> list[bool]:
    return [not model.submit(i * 0.001, 100) for i in range(count)]


def mean_run_length(lost: Sequence[bool]) -> float:
    """Mean length of maximal runs of consecutive losses."""
    runs: list[int] = []
    current = 0
    for is_lost in lost:
        if is_lost:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return sum(runs) / len(runs) if runs else 0.0


def binomial_bound(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# -- determinism ----------------------------------------------------------

NOISY = LinkParams(loss=0.1, p_good_to_bad=0.05, p_bad_to_good=0.3, latency_s=0.05, jitter_s=0.02,
                   bandwidth_bps=100_000, duplicate=0.05, reorder=0.05)


def test_same_seed_gives_same_schedule() -> None:
    times = [i * 0.003 for i in range(2000)]
    assert run(LinkModel(NOISY, 42), times) == run(LinkModel(NOISY, 42), times)


def test_different_seed_gives_different_schedule() -> None:
    times = [i * 0.003 for i in range(2000)]
    assert run(LinkModel(NOISY, 42), times) != run(LinkModel(NOISY, 43), times)


def test_derived_seeds_are_pinned_across_processes() -> None:
    # hash() of a str changes per process; these must not.
    assert derive_seed(7, "uplink") == 11691349203816241732
    assert derive_seed("run-1", "device", 0) == 1124524009530035044


def test_directions_have_independent_seeds() -> None:
    duplex = DuplexLinkModel(LinkParams(loss=0.5), LinkParams(loss=0.5), seed=9)
    assert loss_pattern(duplex.uplink, 200) != loss_pattern(duplex.downlink, 200)


def test_other_knobs_do_not_reshuffle_losses() -> None:
    # Fixed draws per datagram: adding duplication and jitter leaves the loss pattern alone.
    plain = LinkModel(LinkParams(loss=0.2), 5)
    busier = LinkModel(LinkParams(loss=0.2, duplicate=0.5, jitter_s=0.1, reorder=0.3), 5)
    assert loss_pattern(plain, 5000) == loss_pattern(busier, 5000)


def test_time_must_not_go_backwards() -> None:
    model = LinkModel(LinkParams(), 1)
    model.submit(1.0, 10)
    with pytest.raises(ValueError, match="backwards"):
        model.submit(0.5, 10)


@pytest.mark.parametrize("bad", [
    {"loss": 1.5}, {"duplicate": -0.1}, {"latency_s": -1.0}, {"duty_cycle": 0.0},
    {"outages": [(2.0, 1.0)]}, {"periodic_outage": (1.0, 2.0)}, {"queue_bytes": 0},
])
def test_invalid_params_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LinkParams(**bad)


# -- loss ------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_bernoulli_loss_rate(seed: int) -> None:
    n, p = 20_000, 0.1
    model = LinkModel(LinkParams(loss=p), seed)
    rate = sum(loss_pattern(model, n)) / n
    assert abs(rate - p) < binomial_bound(p, n), f"seed={seed} rate={rate}"
    counters = model.counters
    assert counters.dropped_datagrams[DropCause.LOSS] == round(rate * n)
    assert counters.offered_datagrams == n


@pytest.mark.parametrize("seed", SEEDS)
def test_gilbert_elliott_losses_come_in_bursts(seed: int) -> None:
    n = 20_000
    bursty = LinkParams(p_good_to_bad=0.01, p_bad_to_good=0.1, loss_in_bad=1.0)
    average = bursty.expected_loss_rate()  # 0.01 / 0.11 = 0.0909
    independent = LinkParams(loss=average)
    assert average == pytest.approx(0.01 / 0.11)

    bursty_lost = loss_pattern(LinkModel(bursty, seed), n)
    independent_lost = loss_pattern(LinkModel(independent, seed), n)
    # Same average loss (bursts make the estimate noisier, hence the wider bound) ...
    assert abs(sum(bursty_lost) / n - average) < 0.03, f"seed={seed}"
    assert abs(sum(independent_lost) / n - average) < binomial_bound(average, n), f"seed={seed}"
    # ... but runs of consecutive losses ~10 long (1 / p_bad_to_good) instead of ~1.1.
    bursty_run, independent_run = mean_run_length(bursty_lost), mean_run_length(independent_lost)
    assert bursty_run > 3 * independent_run, f"seed={seed} {bursty_run} vs {independent_run}"
    assert 7.0 < bursty_run < 13.0, f"seed={seed} {bursty_run}"


# -- bandwidth, queue, duty cycle, MTU, outages -------------------------------

def test_bandwidth_spaces_deliveries_by_serialisation_time() -> None:
    size, bps, latency = 100, 8_000, 0.05
    model = LinkModel(LinkParams(bandwidth_bps=bps, latency_s=latency, queue_bytes=10_000), 1)
    arrivals = [model.submit(0.0, size)[0] for _ in range(5)]
    airtime = size * 8 / bps  # 0.1 s
    assert arrivals == pytest.approx([latency + airtime * (i + 1) for i in range(5)])
    assert model.backlog_bytes(0.0) == 500
    assert model.backlog_bytes(0.35) == 200


def test_overhead_bytes_count_on_the_wire() -> None:
    model = LinkModel(LinkParams(bandwidth_bps=8_000, overhead_bytes=28), 1)
    assert model.submit(0.0, 72) == pytest.approx([0.1])  # (72 + 28) * 8 / 8000


def test_full_queue_tail_drops() -> None:
    model = LinkModel(LinkParams(bandwidth_bps=8_000, queue_bytes=300), 1)
    first = [model.submit(0.0, 100) for _ in range(5)]
    assert [len(a) for a in first] == [1, 1, 1, 0, 0]
    # At 0.25 s two datagrams are out, one is still sending: room for two more.
    later = [model.submit(0.25, 100) for _ in range(3)]
    assert [len(a) for a in later] == [1, 1, 0]
    assert later[1] == pytest.approx([0.5])
    assert model.counters.dropped_datagrams[DropCause.QUEUE] == 3


def test_duty_cycle_silences_the_transmitter() -> None:
    model = LinkModel(LinkParams(bandwidth_bps=250, overhead_bytes=13, duty_cycle=0.01, queue_bytes=1_000), 1)
    airtime = 64 * 8 / 250  # 2.048 s on air for 51 + 13 bytes
    assert model.submit(0.0, 51) == pytest.approx([airtime])
    # Must stay silent 99 x airtime before the next frame.
    assert model.submit(0.0, 51) == pytest.approx([100 * airtime + airtime])


def test_mtu_drops_larger_datagrams() -> None:
    model = LinkModel(LinkParams(mtu=51), 1)
    assert model.submit(0.0, 51) != []
    assert model.submit(0.0, 52) == []
    assert model.counters.dropped_datagrams[DropCause.MTU] == 1
    assert model.counters.dropped_bytes[DropCause.MTU] == 52


def test_outage_windows_drop_relative_to_link_start() -> None:
    model = LinkModel(LinkParams(outages=[(1.0, 2.0), (5.0, 6.0)]), 1, start=10.0)
    fates = {t: bool(model.submit(t, 10)) for t in (10.5, 11.0, 11.999, 12.0, 14.9, 15.5, 16.0)}
    assert fates == {10.5: True, 11.0: False, 11.999: False, 12.0: True, 14.9: True, 15.5: False, 16.0: True}
    assert model.counters.dropped_datagrams[DropCause.OUTAGE] == 3


def test_periodic_outage_is_down_at_the_end_of_each_period() -> None:
    model = LinkModel(LinkParams(periodic_outage=(10.0, 2.0)), 1)
    assert [model.in_outage(t) for t in (0.0, 7.9, 8.0, 9.99, 10.0, 18.5, 20.0)] == [
        False, False, True, True, False, True, False]


# -- duplication, jitter, reordering ---------------------------------------------

def test_duplication() -> None:
    model = LinkModel(LinkParams(duplicate=1.0, jitter_s=0.01), 1)
    arrivals = run(model, [i * 0.01 for i in range(100)])
    assert all(len(a) == 2 and a[0] <= a[1] for a in arrivals)
    assert model.counters.duplicated_datagrams == 100
    assert model.counters.delivered_datagrams == 200


@pytest.mark.parametrize("seed", SEEDS)
def test_duplication_rate(seed: int) -> None:
    n, p = 10_000, 0.25
    model = LinkModel(LinkParams(duplicate=p), seed)
    rate = sum(len(a) == 2 for a in run(model, [i * 0.001 for i in range(n)])) / n
    assert abs(rate - p) < binomial_bound(p, n), f"seed={seed} rate={rate}"


def test_jitter_alone_keeps_fifo_order() -> None:
    model = LinkModel(LinkParams(latency_s=0.1, jitter_s=0.5), 1)
    arrivals = [a[0] for a in run(model, [i * 0.01 for i in range(1000)])]
    assert arrivals == sorted(arrivals)
    assert all(a >= i * 0.01 + 0.1 for i, a in enumerate(arrivals))


@pytest.mark.parametrize("seed", SEEDS)
def test_reordered_datagrams_are_overtaken(seed: int) -> None:
    n, p, hold = 2_000, 0.1, 1.0
    model = LinkModel(LinkParams(latency_s=0.1, reorder=p, reorder_delay_s=hold), seed)
    times = [i * 0.01 for i in range(n)]
    arrivals = [a[0] for a in run(model, times)]
    held = sum(a - t > 0.1 + hold / 2 for a, t in zip(arrivals, times, strict=True))
    assert abs(held / n - p) < binomial_bound(p, n), f"seed={seed}"
    overtaken = sum(arrivals[i] > arrivals[i + 1] for i in range(n - 1))
    assert overtaken > 0.5 * held, f"seed={seed}"


# -- properties -------------------------------------------------------------------

params_strategy = st.builds(
    LinkParams,
    loss=st.floats(0, 1), p_good_to_bad=st.floats(0, 1), p_bad_to_good=st.floats(0, 1),
    loss_in_good=st.floats(0, 1), loss_in_bad=st.floats(0, 1),
    latency_s=st.floats(0, 10), jitter_s=st.floats(0, 10),
    bandwidth_bps=st.sampled_from([0.0, 250.0, 20_000.0]), queue_bytes=st.integers(1, 5_000),
    overhead_bytes=st.integers(0, 50), duty_cycle=st.sampled_from([1.0, 0.1, 0.01]),
    duplicate=st.floats(0, 1), reorder=st.floats(0, 1), mtu=st.integers(0, 2_000),
    outages=st.lists(st.tuples(st.floats(0, 50), st.floats(0.001, 10)).map(lambda w: (w[0], w[0] + w[1])),
                     max_size=3),
)


@settings(max_examples=150, deadline=None, database=None)  # leave no .hypothesis/ behind
@given(params=params_strategy, seed=st.integers(0, 2**32),
       traffic=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 2_000)), max_size=60))
def test_model_invariants(params: LinkParams, seed: int, traffic: list[tuple[float, int]]) -> None:
    model, replay = LinkModel(params, seed), LinkModel(params, seed)
    now = 0.0
    for gap, size in traffic:
        now += gap
        arrivals = model.submit(now, size)
        assert arrivals == replay.submit(now, size)
        assert len(arrivals) <= 2
        assert all(a >= now + params.latency_s for a in arrivals)
        assert arrivals == sorted(arrivals)
    c = model.counters
    assert c.offered_datagrams == len(traffic)
    assert c.offered_datagrams == c.delivered_datagrams - c.duplicated_datagrams + c.dropped_total


# -- profiles ------------------------------------------------------------------------

def test_profile_names_and_lookup() -> None:
    assert set(PROFILES) == {"lan", "wifi-bad", "gprs", "nb-iot", "lora-sf12", "satellite"}
    assert get_profile("gprs").name == "gprs"
    with pytest.raises(KeyError, match="lora-sf12"):
        get_profile("carrier-pigeon")


def test_profile_figures() -> None:
    lora, satellite = get_profile("lora-sf12"), get_profile("satellite")
    assert (lora.uplink.mtu, lora.uplink.bandwidth_bps, lora.uplink.duty_cycle) == (51, 250, 0.01)
    assert (satellite.uplink.mtu, satellite.downlink.mtu) == (340, 270)
    low, high = get_profile("gprs").rtt_bounds_s(64, 64)
    assert 0.6 <= low and high <= 1.1
    low, high = get_profile("nb-iot").rtt_bounds_s(64, 64)
    assert 1.6 <= low and high <= 10.0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_suggested_ack_timeout_covers_an_idle_round_trip(name: str) -> None:
    profile = get_profile(name)
    size = min(64, profile.uplink.mtu, profile.downlink.mtu)
    assert profile.ack_timeout >= profile.rtt_bounds_s(size, size)[1]
    assert profile.max_transmit_wait > profile.max_transmit_span > 0


def test_lora_ack_timeout_outlasts_the_duty_cycle_silence() -> None:
    lora = get_profile("lora-sf12")
    model = LinkModel(lora.uplink, 1)
    assert model.submit(0.0, 52) == []  # over the 51-byte frame
    airtime = (51 + 13) * 8 / 250
    assert model.params.queue_bytes == 64  # the radio holds one frame ...
    assert lora.ack_timeout > 99 * airtime  # ... and then must keep silent this long


# -- real UDP on loopback ---------------------------------------------------------------

class EchoServer(asyncio.DatagramProtocol):
    """Echoes every datagram to its source and remembers the sources seen."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: list[Address] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.sources.append((addr[0], addr[1]))
        assert self.transport is not None
        self.transport.sendto(data, addr)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)


class Device(asyncio.DatagramProtocol):
    """A device's socket, connected to the relay."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    async def exchange(self, data: bytes, timeout: float = 2.0) -> bytes:
        self.send(data)
        return await asyncio.wait_for(self.received.get(), timeout)


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(EchoServer, local_addr=("127.0.0.1", 0))
    yield server
    transport.close()


async def open_device(relay: UdpLinkRelay) -> Device:
    loop = asyncio.get_running_loop()
    _, device = await loop.create_datagram_endpoint(Device, remote_addr=relay.address)
    return device


@pytest_asyncio.fixture
async def devices() -> AsyncIterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        if device.transport is not None:
            device.transport.close()


def offered_reached(relay: UdpLinkRelay, count: int) -> bool:
    return relay.uplink_counters.offered_datagrams == count


async def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_relay_echoes_over_lan_profile(echo_server: EchoServer, devices: list[Device]) -> None:
    lan = get_profile("lan")
    async with UdpLinkRelay(echo_server.address, lan.uplink, lan.downlink, seed=1) as relay:
        first, second = await open_device(relay), await open_device(relay)
        devices += [first, second]
        for i in range(10):
            assert await first.exchange(b"a%d" % i) == b"a%d" % i
            assert await second.exchange(b"b%d" % i) == b"b%d" % i
        assert relay.devices == (first.address, second.address)
        # One upstream port per device, and that is what the server saw.
        ports = {relay.upstream_address(d.address) for d in (first, second)}
        assert ports == set(echo_server.sources) and len(ports) == 2
        assert relay.uplink_counters.delivered_datagrams == 20
        assert relay.downlink_counters.delivered_datagrams == 20
        assert relay.device_counters(first.address).uplink.offered_datagrams == 10


@pytest.mark.asyncio
async def test_relay_applies_loss(echo_server: EchoServer, devices: list[Device]) -> None:
    n, p, seed = 1_000, 0.3, 11
    async with UdpLinkRelay(echo_server.address, LinkParams(loss=p), LinkParams(), seed=seed) as relay:
        device = await open_device(relay)
        devices.append(device)
        for batch in range(0, n, 50):
            for i in range(batch, batch + 50):
                device.send(b"%d" % i)
            # One batch in flight at a time: far below the socket buffers' limits
            # even when the machine is busy, so the kernel drops nothing.
            await wait_until(functools.partial(offered_reached, relay, batch + 50))
        expected = relay.uplink_counters.delivered_datagrams
        await wait_until(lambda: device.received.qsize() == expected)
        await asyncio.sleep(0.05)
        assert device.received.qsize() == expected == len(echo_server.sources)
        rate = 1 - expected / n
        assert abs(rate - p) < binomial_bound(p, n), f"seed={seed} rate={rate}"
        assert relay.uplink_counters.dropped_datagrams[DropCause.LOSS] == n - expected


@pytest.mark.asyncio
async def test_rebind_moves_the_device_to_a_new_port(echo_server: EchoServer, devices: list[Device]) -> None:
    lan = get_profile("lan")
    async with UdpLinkRelay(echo_server.address, lan.uplink, lan.downlink, seed=1) as relay:
        device = await open_device(relay)
        devices.append(device)
        assert await device.exchange(b"before") == b"before"
        old = echo_server.sources[-1]
        assert relay.upstream_address(device.address) == old

        relay.rebind(device.address)
        assert await device.exchange(b"after") == b"after"
        new = echo_server.sources[-1]
        assert new[1] != old[1]
        assert relay.upstream_address(device.address) == new

        # The server's replies to the old mapping are lost, as behind a NAT.
        assert echo_server.transport is not None
        echo_server.transport.sendto(b"to old port", old)
        await asyncio.sleep(0.1)
        assert device.received.empty()
        assert await device.exchange(b"still works") == b"still works"
        assert relay.stats.rebinds == 1 and relay.stats.bindings_opened == 2
        with pytest.raises(KeyError):
            relay.rebind(("127.0.0.1", 9))


@pytest.mark.asyncio
async def test_periodic_rebinding(echo_server: EchoServer, devices: list[Device]) -> None:
    nat = NatParams(rebind_interval_s=0.3)
    async with UdpLinkRelay(echo_server.address, LinkParams(), LinkParams(), nat=nat) as relay:
        device = await open_device(relay)
        devices.append(device)
        assert await device.exchange(b"one") == b"one"
        await asyncio.sleep(0.4)
        assert await device.exchange(b"two") == b"two"
        assert echo_server.sources[0][1] != echo_server.sources[1][1]
        assert relay.stats.rebinds >= 1


@pytest.mark.asyncio
async def test_nat_idle_timeout_drops_late_server_datagrams(echo_server: EchoServer,
                                                            devices: list[Device]) -> None:
    nat = NatParams(idle_timeout_s=0.3)
    async with UdpLinkRelay(echo_server.address, LinkParams(), LinkParams(), nat=nat) as relay:
        device = await open_device(relay)
        devices.append(device)
        assert await device.exchange(b"hello") == b"hello"
        old = echo_server.sources[-1]
        await asyncio.sleep(0.4)  # binding idles out
        assert echo_server.transport is not None
        echo_server.transport.sendto(b"notification", old)
        await wait_until(lambda: relay.stats.nat_expired_drops == 1)
        assert device.received.empty()
        # The device's next datagram opens a new binding.
        assert await device.exchange(b"again") == b"again"
        assert echo_server.sources[-1][1] != old[1]


@pytest.mark.asyncio
async def test_relay_outage_then_recovery(echo_server: EchoServer, devices: list[Device]) -> None:
    params = LinkParams(outages=[(0.0, 0.4)])
    async with UdpLinkRelay(echo_server.address, params, LinkParams()) as relay:
        device = await open_device(relay)
        devices.append(device)
        device.send(b"lost")
        await asyncio.sleep(0.45)
        assert device.received.empty()
        assert await device.exchange(b"back") == b"back"
        assert relay.uplink_counters.dropped_datagrams[DropCause.OUTAGE] == 1


def test_relay_refuses_non_loopback_servers() -> None:
    for host in ("192.0.2.1", "example.org", "0.0.0.0"):
        with pytest.raises(ValueError, match="loopback"):
            UdpLinkRelay((host, 5683), LinkParams(), LinkParams())
