"""Named link profiles for the device simulator, with where their figures come from.

A ``LinkProfile`` is an uplink (device -> server) and a downlink ``LinkParams``
plus the CoAP transmission parameters (RFC 7252 section 4.8) suggested for a
device on that link. ``latency_s`` is one way and excludes serialisation,
which ``bandwidth_bps`` adds; ``mtu`` is the largest UDP payload carried.

Figures and sources (one-way unless marked RTT)
-----------------------------------------------

=========== ============ ============== ========== ========= ====================
profile     latency      rate up/down   mtu up/dn  loss/way  CoAP ACK_TIMEOUT/RF/MR
=========== ============ ============== ========== ========= ====================
lan         0.5-1 ms     unlimited      1472       0         2 s / 1.5 / 4
wifi-bad    5-65 ms      2 Mbit/s       1472       ~6.4 %    2 s / 1.5 / 4
gprs        0.3-0.5 s    20 / 40 kbit/s 1472       ~2.3 %    3 s / 1.5 / 4
nb-iot      0.8-4.8 s    40 / 20 kbit/s 1232       ~2.7 %    10 s / 1.5 / 3
lora-sf12   0.1 s / 1 s  250 bit/s      51         ~5 %      210 s / 1.5 / 2
satellite   5-10 / 5-20s 2.4 kbit/s     340 / 270  ~10 %     35 s / 1.5 / 2
=========== ============ ============== ========== ========= ====================

[RFC7252]  CoAP, section 4.8: ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR 1.5,
           MAX_RETRANSMIT 4 as defaults; 4.8.2 for MAX_TRANSMIT_SPAN/WAIT and
           the assumed MAX_LATENCY of 100 s.
[RFC894]   Ethernet MTU 1500 -> 1472 bytes of UDP payload over IPv4 (20 + 8
           bytes of headers).
[RFC8200]  IPv6, section 5: minimum link MTU 1280 -> 1232 bytes of UDP payload
           (40 + 8 bytes of headers), the size that survives any IPv6 path.
[RFC3481]  TCP over 2.5G/3G, section 2: GPRS round-trip times of several
           hundred ms up to about a second, delay spikes (2.4), losses and
           gaps around cell reselection and handover (2.5, 2.6).
[GSM-CS2]  GPRS coding scheme CS-2 carries 13.4 kbit/s per timeslot; typical
           terminals use 1-2 uplink and 3-4 downlink slots.
[TR45820]  3GPP TR 45.820 (Cellular IoT study): latency objective of 10 s for
           exception reports.
[TS36306]  3GPP TS 36.306, UE category NB1 (Rel-13): peak rates in the tens of
           kbit/s (about 26 kbit/s down, 60 kbit/s up with multi-tone).
[RFC8376]  LPWAN overview: NB-IoT (2.3), LoRaWAN (2.1) characteristics.
[LoRaRP]   LoRaWAN Regional Parameters (1.0.3revA / RP002), EU863-870: DR0 =
           SF12/125 kHz = 250 bit/s; maximum application payload N = 51 bytes
           at DR0-DR2; RECEIVE_DELAY1 = 1 s; RX2 at 869.525 MHz, DR0.
[LoRaL2]   LoRaWAN L2 1.0.4: frame overhead MHDR 1 + FHDR 7 (no FOpts) +
           FPort 1 + MIC 4 = 13 bytes.
[EN300220] ETSI EN 300 220: 1 % duty cycle in the 868.0-868.6 MHz sub-band
           used by the default uplink channels, 10 % at 869.4-869.65 MHz (RX2).
[SBD]      Iridium Short Burst Data developer's guide and product notes:
           9602/9603 transceivers take MO messages up to 340 bytes and MT up
           to 270 bytes; network transit ~5 s for short messages, up to ~20 s
           for long ones; 2.4 kbit/s channel; the gateway queues up to 50 MT
           messages, delivered on the next mailbox check.

Losses, jitter, queue sizes, duplication and reordering are not from any
standard: they are illustrative assumptions chosen to exercise retransmission,
deduplication and reconnection, and are marked "assumption" below. The LoRa
and Iridium downlinks (receive windows, mailbox checks) are approximated by a
fixed latency plus jitter. The LoRa profile treats 51 bytes as the UDP
payload limit; a real deployment compresses IPv6/UDP/CoAP with SCHC
(RFC 8724, RFC 8824), so CoAP messages there fit even less.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, replace

from device_sim.link import LinkParams

__all__ = ["PROFILES", "LinkProfile", "get_profile", "profile_names"]

_IPV4_UDP_HEADERS = 28  # 20 (IPv4) + 8 (UDP)
_IPV6_UDP_HEADERS = 48  # 40 (IPv6) + 8 (UDP)
_LORAWAN_FRAME_OVERHEAD = 13  # [LoRaL2]


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """Link settings for both directions plus suggested CoAP parameters."""

    name: str
    summary: str
    uplink: LinkParams
    downlink: LinkParams
    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    sources: tuple[str, ...] = ()

    @property
    def max_transmit_span(self) -> float:
        """RFC 7252 4.8.2: first to last transmission of a CON message."""
        return self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def max_transmit_wait(self) -> float:
        """RFC 7252 4.8.2: first transmission to giving up on an ACK."""
        return self.ack_timeout * ((1 << (self.max_retransmit + 1)) - 1) * self.ack_random_factor

    def rtt_bounds_s(self, request_bytes: int = 64, response_bytes: int = 64) -> tuple[float, float]:
        """Shortest and longest round trip of one exchange on an idle link.

        Latency plus serialisation each way, with no jitter (shortest) or full
        jitter (longest); queueing, duty-cycle waits and losses excluded.
        """
        shortest = longest = 0.0
        for params, size in ((self.uplink, request_bytes), (self.downlink, response_bytes)):
            serialisation = ((size + params.overhead_bytes) * 8.0 / params.bandwidth_bps
                             if params.bandwidth_bps > 0 else 0.0)
            shortest += params.latency_s + serialisation
            longest += params.latency_s + serialisation + params.jitter_s
        return shortest, longest


def _symmetric(params: LinkParams) -> tuple[LinkParams, LinkParams]:
    return params, params


_LAN = LinkProfile(
    "lan",
    "Wired LAN: sub-millisecond, lossless; a baseline.",
    *_symmetric(LinkParams(latency_s=0.0005, jitter_s=0.0005, mtu=1472)),
    sources=("RFC7252 4.8 defaults", "RFC894 MTU 1500"),
)

_WIFI_BAD = LinkProfile(
    "wifi-bad",
    "Congested 2.4 GHz Wi-Fi far from the access point: bursty loss, jitter.",
    *_symmetric(LinkParams(
        loss=0.02,  # assumption
        # Interference bursts (assumption): P(bad) = 0.02 / 0.27 = 7.4 %,
        # mean burst 4 datagrams, 60 % lost in a burst -> ~4.4 % more.
        p_good_to_bad=0.02, p_bad_to_good=0.25, loss_in_bad=0.6,
        latency_s=0.005, jitter_s=0.06,  # assumption: MAC retries add tens of ms
        bandwidth_bps=2_000_000, queue_bytes=131_072, overhead_bytes=_IPV4_UDP_HEADERS,
        duplicate=0.002, reorder=0.005, reorder_delay_s=0.03,  # assumption
        mtu=1472,
    )),
    sources=("RFC7252 4.8 defaults", "RFC894 MTU 1500", "loss/jitter: assumption"),
)

_GPRS_COMMON = LinkParams(
    # 0.3 s + up to 0.2 s jitter each way: RTT 0.6-1.0 s [RFC3481 2.1].
    latency_s=0.3, jitter_s=0.2,
    # Residual loss plus bursts around cell reselection [RFC3481 2.5, 2.6]
    # (rates are assumptions): P(bad) = 0.002 / 0.102 = 2 %, 90 % lost.
    loss=0.005, p_good_to_bad=0.002, p_bad_to_good=0.1, loss_in_bad=0.9,
    queue_bytes=32_768,  # assumption: deep RLC/SGSN buffers
    overhead_bytes=_IPV4_UDP_HEADERS, mtu=1472,
)

_GPRS = LinkProfile(
    "gprs",
    "GPRS (2.5G): RTT 0.6-1 s, tens of kbit/s, some bursty loss.",
    uplink=replace(_GPRS_COMMON, bandwidth_bps=20_000),  # ~1.5 CS-2 slots
    downlink=replace(_GPRS_COMMON, bandwidth_bps=40_000),  # 3 CS-2 slots
    # RTT up to 1 s plus ~0.5 s serialising 1 KiB at 20 kbit/s and delay
    # spikes [RFC3481 2.4]: a 2 s timeout would retransmit spuriously.
    ack_timeout=3.0,
    sources=("RFC3481 2.1-2.6", "GSM-CS2 13.4 kbit/s per slot", "RFC7252 4.8"),
)

_NB_IOT_COMMON = LinkParams(
    # 0.8 s + up to 4 s each way: RTT 1.6-9.6 s, the upper end being the
    # 10 s objective of [TR45820]; depends on coverage class (repetitions).
    latency_s=0.8, jitter_s=4.0,
    # HARQ/RLC leave little residual loss; coverage dips come in bursts
    # (assumptions): P(bad) = 0.005 / 0.205 = 2.4 %, 70 % lost.
    loss=0.01, p_good_to_bad=0.005, p_bad_to_good=0.2, loss_in_bad=0.7,
    queue_bytes=16_384,  # assumption
    overhead_bytes=_IPV6_UDP_HEADERS,
    mtu=1232,  # [RFC8200]: IPv6 minimum MTU; operators advertise 1280-1500
)

_NB_IOT = LinkProfile(
    "nb-iot",
    "NB-IoT (LTE Cat-NB1): RTT 1.6-10 s, 20-40 kbit/s effective.",
    uplink=replace(_NB_IOT_COMMON, bandwidth_bps=40_000),
    downlink=replace(_NB_IOT_COMMON, bandwidth_bps=20_000),
    # Above the longest idle RTT (~9.8 s), so the first retransmission is not
    # spurious; 3 retransmissions keep MAX_TRANSMIT_WAIT at 225 s.
    ack_timeout=10.0, max_retransmit=3,
    sources=("TR45820 10 s latency", "TS36306 Cat-NB1 rates", "RFC8376 2.3", "RFC8200 5"),
)

_LORA_COMMON = LinkParams(
    bandwidth_bps=250,  # [LoRaRP] DR0 = SF12/125 kHz
    overhead_bytes=_LORAWAN_FRAME_OVERHEAD,
    mtu=51,  # [LoRaRP] N at DR0
    loss=0.05,  # assumption: ALOHA collisions and edge-of-coverage
)

_LORA_SF12 = LinkProfile(
    "lora-sf12",
    "LoRaWAN class A, EU868 DR0 (SF12): 51-byte frames, 250 bit/s, duty cycle.",
    uplink=replace(
        _LORA_COMMON,
        latency_s=0.1, jitter_s=0.05,  # gateway -> network server backhaul (assumption)
        duty_cycle=0.01,  # [EN300220] 1 % on the default uplink channels
        queue_bytes=51 + _LORAWAN_FRAME_OVERHEAD,  # the radio holds one frame
    ),
    downlink=replace(
        _LORA_COMMON,
        latency_s=1.0,  # [LoRaRP] RX1 opens RECEIVE_DELAY1 = 1 s after the uplink
        duty_cycle=0.1,  # [EN300220] 10 % in the RX2 sub-band
        queue_bytes=4 * (51 + _LORAWAN_FRAME_OVERHEAD),  # network server queue (assumption)
    ),
    # A full frame is 64 bytes = 2.05 s on air, then 99 x 2.05 = 203 s of
    # enforced silence: any retransmission sooner only waits in the radio.
    # MAX_TRANSMIT_SPAN becomes 945 s, beyond RFC 7252's MAX_LATENCY
    # assumption of 100 s, so EXCHANGE_LIFETIME must be scaled too.
    ack_timeout=210.0, max_retransmit=2,
    sources=("LoRaRP EU863-870 DR0", "LoRaL2 1.0.4 frame format", "EN300220 duty cycle",
             "RFC8376 2.1", "RFC8724/RFC8824 SCHC"),
)

_SATELLITE = LinkProfile(
    "satellite",
    "Iridium SBD-like: 340-byte MO / 270-byte MT messages, 5-20 s transit.",
    uplink=LinkParams(
        latency_s=5.0, jitter_s=5.0,  # [SBD] ~5 s for short messages
        bandwidth_bps=2_400, mtu=340,  # [SBD] channel rate, 9602/9603 MO limit
        queue_bytes=340,  # the transceiver has one MO buffer
        # Sky view blocked (assumption): P(bad) = 0.02 / 0.22 = 9 %, all lost.
        loss=0.01, p_good_to_bad=0.02, p_bad_to_good=0.2, loss_in_bad=1.0,
    ),
    downlink=LinkParams(
        latency_s=5.0, jitter_s=15.0,  # [SBD] up to ~20 s; waits for a mailbox check
        bandwidth_bps=2_400, mtu=270,  # [SBD] MT limit
        queue_bytes=50 * 270,  # [SBD] gateway MT queue of 50 messages
        loss=0.01, p_good_to_bad=0.02, p_bad_to_good=0.2, loss_in_bad=1.0,
    ),
    # Longest idle RTT ~32 s (10 s up, 20 s down, ~2 s on the channel).
    ack_timeout=35.0, max_retransmit=2,
    sources=("SBD developer's guide: 340/270 bytes, 5-20 s", "RFC7252 4.8"),
)

PROFILES: Mapping[str, LinkProfile] = types.MappingProxyType({
    profile.name: profile
    for profile in (_LAN, _WIFI_BAD, _GPRS, _NB_IOT, _LORA_SF12, _SATELLITE)
})
"""All profiles by name (read-only)."""


def profile_names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(name: str) -> LinkProfile:
    """The profile called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown link profile {name!r}; known: {', '.join(PROFILES)}") from None
