"""What a fleet run measured: a recorder fed by the devices, a JSON summary, a PNG plot.

Theory of operation
===================

:class:`Recorder` is pure: every method takes the time (seconds since the run began)
as an argument, and it never reads a clock or touches the network. Devices tell it
what their *applications* saw:

- IMs: the first attempt of each (sender, id), every resend, the 2.01 (with the seq),
  giving up, and each time a recipient application is handed the message. Delivered
  exactly once means handed over once; a second hand-over is a duplicate seen by an
  application (the gateway deduplicates resends, the device filters by cursor, so the
  count must be 0).
- Presence: the first attempt of each publish (every publish carries a unique note) and
  the first time each watcher's application sees that note, whether it came in a
  notification, in the first response of a (re-)registration or in a poll. Observe may merge
  changes (RFC 7641 4.5), so not every publish is seen by every watcher.
- Out of contact: when a device vanished and when each watcher first saw it flagged
  out of contact. A flag on a presentity that did not vanish is counted separately: it
  is not necessarily wrong (a live device whose link stalled past its lease is out of
  contact), but it is not what the vanishing scenario tests.
- Operations: every request a device puts on its link (including resends and
  observation registrations), by kind.

:func:`summarise` turns that and the per-device link counters into the JSON result;
:func:`plot` draws it (matplotlib, imported only there).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LinkReport", "Recorder", "percentiles", "plot", "summarise"]

ImKey = tuple[str, bytes]  # (sender, message id)


def percentiles(samples: Iterable[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float | int | None]:
    """Linear-interpolation percentiles (as numpy's default), plus n and max.

    >>> percentiles([1.0, 2.0, 3.0, 4.0])
    {'n': 4, 'p50': 2.5, 'p95': 3.85, 'p99': 3.97, 'max': 4.0}
    >>> percentiles([])
    {'n': 0, 'p50': None, 'p95': None, 'p99': None, 'max': None}
    """
    values = sorted(samples)
    out: dict[str, float | int | None] = {"n": len(values)}
    for point in points:
        if not values:
            out[f"p{point:g}"] = None
            continue
        rank = (len(values) - 1) * point / 100.0
        low, high = math.floor(rank), math.ceil(rank)
        value = values[low] + (values[high] - values[low]) * (rank - low)
        out[f"p{point:g}"] = round(value, 4)
    out["max"] = round(values[-1], 4) if values else None
    return out


@dataclass(slots=True)
class SentIm:
    sender: str
    recipient: str
    msg_id: bytes
    first_attempt: float
    to_sleepy: bool
    attempts: int = 1
    accepted_at: float | None = None
    seq: int | None = None
    gave_up: bool = False
    rejected: str | None = None


@dataclass(slots=True)
class Publish:
    presentity: str
    started: float
    accepted_at: float | None = None


@dataclass(frozen=True, slots=True)
class LinkReport:
    """One device's link, both directions, from its relay's counters."""

    device: str
    role: str
    up_datagrams: int
    up_bytes: int
    up_unique: int
    up_delivered: int
    down_datagrams: int
    down_bytes: int
    down_unique: int
    down_delivered: int
    up_overhead_bytes: int = 0
    """Per-datagram link/IP/UDP bytes of the profile (counted once per offered datagram)."""
    down_overhead_bytes: int = 0


@dataclass
class Recorder:
    """Application-level observations of one run (times in seconds since the run began)."""

    sent: dict[ImKey, SentIm] = field(default_factory=dict)
    received: dict[ImKey, list[float]] = field(default_factory=dict)
    unexpected_receipts: int = 0
    publishes: dict[tuple[str, str], Publish] = field(default_factory=dict)
    presence_latencies: list[float] = field(default_factory=list)
    presence_seen: int = 0
    _seen_notes: set[tuple[str, str, str]] = field(default_factory=set)
    vanished: dict[str, float] = field(default_factory=dict)
    lease_of: dict[str, int] = field(default_factory=dict)
    watchers_of: dict[str, set[str]] = field(default_factory=dict)
    detections: dict[tuple[str, str], float] = field(default_factory=dict)
    live_out_of_contact: set[tuple[str, str, int]] = field(default_factory=set)
    operations: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    observations_established: dict[str, list[float]] = field(default_factory=dict)

    # IMs ---------------------------------------------------------------------------

    def im_attempt(self, sender: str, recipient: str, msg_id: bytes, now: float, *, to_sleepy: bool = False) -> None:
        key = (sender, msg_id)
        record = self.sent.get(key)
        if record is None:
            self.sent[key] = SentIm(sender, recipient, msg_id, now, to_sleepy)
        else:
            record.attempts += 1

    def im_accepted(self, sender: str, msg_id: bytes, seq: int, now: float) -> None:
        record = self.sent[(sender, msg_id)]
        if record.accepted_at is None:
            record.accepted_at = now
            record.seq = seq

    def im_gave_up(self, sender: str, msg_id: bytes, reason: str | None = None) -> None:
        record = self.sent[(sender, msg_id)]
        record.gave_up = reason is None
        record.rejected = reason

    def im_received(self, recipient: str, sender: str, msg_id: bytes, now: float) -> None:
        key = (sender, msg_id)
        if key not in self.sent or self.sent[key].recipient != recipient:
            self.unexpected_receipts += 1
        self.received.setdefault(key, []).append(now)

    def in_flight(self) -> int:
        return sum(1 for r in self.sent.values() if r.accepted_at is None and not r.gave_up and r.rejected is None)

    def undelivered(self) -> list[SentIm]:
        """Accepted (2.01) IMs not yet handed to the recipient application."""
        return [r for k, r in self.sent.items() if r.accepted_at is not None and k not in self.received]

    def duplicates(self) -> int:
        return sum(len(times) - 1 for times in self.received.values() if len(times) > 1)

    # presence ----------------------------------------------------------------------

    def publish_attempt(self, presentity: str, note: str, now: float) -> None:
        self.publishes.setdefault((presentity, note), Publish(presentity, now))

    def publish_accepted(self, presentity: str, note: str, now: float) -> None:
        record = self.publishes[(presentity, note)]
        if record.accepted_at is None:
            record.accepted_at = now

    def presence(
        self, watcher: str, presentity: str, note: str | None, version: int, out_of_contact: bool, now: float
    ) -> None:
        if out_of_contact:
            if presentity in self.vanished:
                self.detections.setdefault((watcher, presentity), now)
            else:
                self.live_out_of_contact.add((watcher, presentity, version))
            return
        if note is None or (watcher, presentity, note) in self._seen_notes:
            return
        self._seen_notes.add((watcher, presentity, note))
        publish = self.publishes.get((presentity, note))
        if publish is not None:
            self.presence_seen += 1
            self.presence_latencies.append(now - publish.started)

    def watching(self, watcher: str, presentity: str) -> None:
        self.watchers_of.setdefault(presentity, set()).add(watcher)

    def vanish(self, presentity: str, now: float, lease: int) -> None:
        self.vanished[presentity] = now
        self.lease_of[presentity] = lease

    def pending_detections(self, live: Iterable[str]) -> int:
        """(watcher, vanished presentity) pairs not yet detected, among live watchers."""
        alive = set(live)
        return sum(
            1
            for presentity in self.vanished
            for watcher in self.watchers_of.get(presentity, ())
            if watcher in alive and (watcher, presentity) not in self.detections
        )

    # operations --------------------------------------------------------------------

    def operation(self, kind: str) -> None:
        self.operations[kind] += 1

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def observation_established(self, device: str, now: float) -> None:
        self.observations_established.setdefault(device, []).append(now)


def _direction(links: Sequence[LinkReport], up: bool, operations: int) -> dict[str, Any]:
    datagrams = sum(r.up_datagrams if up else r.down_datagrams for r in links)
    payload = sum(r.up_bytes if up else r.down_bytes for r in links)
    overhead = sum(r.up_overhead_bytes if up else r.down_overhead_bytes for r in links)
    unique = sum(r.up_unique if up else r.down_unique for r in links)
    delivered = sum(r.up_delivered if up else r.down_delivered for r in links)
    return {
        "datagrams": datagrams,
        "payload_bytes": payload,
        "wire_bytes": payload + overhead,
        "unique_datagrams": unique,
        "retransmissions": datagrams - unique,
        "delivered_datagrams": delivered,
        "lost_datagrams": datagrams - delivered,
        "per_operation": {
            "datagrams": round(datagrams / operations, 3) if operations else None,
            "wire_bytes": round((payload + overhead) / operations, 1) if operations else None,
        },
    }


def summarise(
    recorder: Recorder,
    links: Sequence[LinkReport],
    *,
    config: Mapping[str, Any],
    elapsed: float,
    traffic_end: float,
) -> dict[str, Any]:
    """The full JSON result of one run."""
    sent = list(recorder.sent.values())
    accepted = [r for r in sent if r.accepted_at is not None]
    delivered = [r for r in accepted if (r.sender, r.msg_id) in recorder.received]
    once = [r for r in delivered if len(recorder.received[(r.sender, r.msg_id)]) == 1]
    latencies = [
        recorder.received[(r.sender, r.msg_id)][0] - r.first_attempt for r in delivered if not r.to_sleepy
    ]
    sleepy_latencies = [recorder.received[(r.sender, r.msg_id)][0] - r.first_attempt for r in delivered if r.to_sleepy]
    delivered_unacknowledged = sum(
        1 for key, r in recorder.sent.items() if r.accepted_at is None and key in recorder.received
    )
    operations = sum(recorder.operations.values())

    detections: list[dict[str, Any]] = []
    detect_times: list[float] = []
    for presentity, at in sorted(recorder.vanished.items()):
        for watcher in sorted(recorder.watchers_of.get(presentity, ())):
            seen = recorder.detections.get((watcher, presentity))
            if seen is not None:
                detect_times.append(seen - at)
            detections.append(
                {
                    "presentity": presentity,
                    "watcher": watcher,
                    "lease_s": recorder.lease_of[presentity],
                    "vanished_at_s": round(at, 3),
                    "detected_after_s": None if seen is None else round(seen - at, 3),
                }
            )

    by_role: dict[str, dict[str, int]] = {}
    for link in links:
        role = by_role.setdefault(link.role, {"devices": 0, "up_wire_bytes": 0, "down_wire_bytes": 0})
        role["devices"] += 1
        role["up_wire_bytes"] += link.up_bytes + link.up_overhead_bytes
        role["down_wire_bytes"] += link.down_bytes + link.down_overhead_bytes

    return {
        "config": dict(config),
        "elapsed_s": round(elapsed, 3),
        "traffic_end_s": round(traffic_end, 3),
        "im": {
            "sent": len(sent),
            "accepted": len(accepted),
            "delivered": len(delivered),
            "delivered_exactly_once": len(once),
            "delivery_ratio": round(len(delivered) / len(accepted), 4) if accepted else None,
            "undelivered": len(accepted) - len(delivered),
            "duplicates_seen_by_applications": recorder.duplicates(),
            "unexpected_receipts": recorder.unexpected_receipts,
            "resends": sum(r.attempts - 1 for r in sent),
            "in_flight_at_end": recorder.in_flight(),
            "gave_up": sum(1 for r in sent if r.gave_up),
            "rejected": sum(1 for r in sent if r.rejected is not None),
            "delivered_without_2_01": delivered_unacknowledged,
            "undelivered_list": [
                {"from": r.sender, "to": r.recipient, "seq": r.seq, "accepted_at_s": round(r.accepted_at or 0.0, 3)}
                for r in recorder.undelivered()[:50]
            ],
            "latency_s": percentiles(latencies),
            "latency_to_sleepy_s": percentiles(sleepy_latencies),
        },
        "presence": {
            "publishes": len(recorder.publishes),
            "accepted": sum(1 for p in recorder.publishes.values() if p.accepted_at is not None),
            "seen_by_watchers": recorder.presence_seen,
            "latency_s": percentiles(recorder.presence_latencies),
            "out_of_contact_not_vanished": len(recorder.live_out_of_contact),
        },
        "out_of_contact": {
            "vanished": len(recorder.vanished),
            "watchers": len(detections),
            "detected": len(detect_times),
            "missed": len(detections) - len(detect_times),
            "detect_s": percentiles(detect_times),
            "detections": detections,
        },
        "air": {
            "operations": operations,
            "operations_by_kind": dict(sorted(recorder.operations.items())),
            "up": _direction(links, True, operations),
            "down": _direction(links, False, operations),
            "by_role": by_role,
            "by_device": [
                {
                    "device": link.device,
                    "role": link.role,
                    "up": [link.up_datagrams, link.up_unique, link.up_delivered],
                    "down": [link.down_datagrams, link.down_unique, link.down_delivered],
                }
                for link in links
            ],
            "by_device_fields": "[offered, unique, delivered] datagrams",
        },
        "errors": dict(sorted(recorder.errors.items())),
    }


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The one-line JSON summary printed last."""
    im, presence, ooc, air = result["im"], result["presence"], result["out_of_contact"], result["air"]
    return {
        "devices": result["config"].get("devices"),
        "profile": result["config"].get("profile"),
        "seed": result["config"].get("seed"),
        "duration_s": result["config"].get("duration_s"),
        "im_sent": im["sent"],
        "im_accepted": im["accepted"],
        "im_delivered": im["delivered"],
        "delivery_ratio": im["delivery_ratio"],
        "duplicates": im["duplicates_seen_by_applications"],
        "im_latency_s": {k: im["latency_s"][k] for k in ("p50", "p95", "p99")},
        "presence_latency_s": {k: presence["latency_s"][k] for k in ("p50", "p95", "p99")},
        "out_of_contact_detect_s": {k: ooc["detect_s"][k] for k in ("p50", "max")},
        "out_of_contact_missed": ooc["missed"],
        "up": {k: air["up"][k] for k in ("datagrams", "wire_bytes", "retransmissions")},
        "down": {k: air["down"][k] for k in ("datagrams", "wire_bytes", "retransmissions")},
        "per_operation_wire_bytes": {"up": air["up"]["per_operation"]["wire_bytes"],
                                     "down": air["down"]["per_operation"]["wire_bytes"]},
        "result": result.get("files", {}).get("json"),
        "plot": result.get("files", {}).get("png"),
    }


def _cdf(ax: Any, samples: Sequence[float], label: str) -> None:
    if not samples:
        return
    xs = sorted(samples)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")


def plot(result: Mapping[str, Any], recorder: Recorder, path: Path) -> None:
    """Four panels: latency CDFs, IMs over time, bytes on the air, out-of-contact detection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    im = result["im"]
    fig.suptitle(
        f"{config.get('devices')} devices, profile {config.get('profile')}, {config.get('duration_s')} s, "
        f"seed {config.get('seed')}: delivery {im['delivered']}/{im['accepted']}, "
        f"duplicates {im['duplicates_seen_by_applications']}"
    )

    ax = axes[0][0]
    delivered = [r for k, r in recorder.sent.items() if r.accepted_at is not None and k in recorder.received]
    _cdf(ax, [recorder.received[(r.sender, r.msg_id)][0] - r.first_attempt for r in delivered if not r.to_sleepy],
         "IM, online recipient")
    _cdf(ax, [recorder.received[(r.sender, r.msg_id)][0] - r.first_attempt for r in delivered if r.to_sleepy],
         "IM, sleepy recipient")
    _cdf(ax, recorder.presence_latencies, "presence publish -> watcher")
    ax.set_xscale("log")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction")
    ax.set_title("Latency (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[0][1]
    for label, times in (
        ("sent (first attempt)", [r.first_attempt for r in recorder.sent.values()]),
        ("accepted (2.01)", [r.accepted_at for r in recorder.sent.values() if r.accepted_at is not None]),
        ("delivered to application", [ts[0] for ts in recorder.received.values()]),
    ):
        xs = sorted(times)
        ax.step(xs, range(1, len(xs) + 1), where="post", label=label)
    ax.axvline(result["traffic_end_s"], color="grey", linestyle="--", label="traffic ends")
    for at in recorder.vanished.values():
        ax.axvline(at, color="red", alpha=0.4, linestyle=":")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("IMs")
    ax.set_title("IMs over time (red dotted: a device vanishes)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1][0]
    roles = sorted(result["air"]["by_role"])
    ups = [result["air"]["by_role"][r]["up_wire_bytes"] / max(1, result["air"]["by_role"][r]["devices"]) for r in roles]
    downs = [
        result["air"]["by_role"][r]["down_wire_bytes"] / max(1, result["air"]["by_role"][r]["devices"]) for r in roles
    ]
    xs = list(range(len(roles)))
    ax.bar([x - 0.2 for x in xs], ups, width=0.4, label="up (device -> gateway)")
    ax.bar([x + 0.2 for x in xs], downs, width=0.4, label="down (gateway -> device)")
    ax.set_xticks(xs, roles)
    up, down = result["air"]["up"], result["air"]["down"]
    ax.set_title(
        f"Wire bytes per device by role; retransmitted datagrams up {up['retransmissions']}/{up['datagrams']}, "
        f"down {down['retransmissions']}/{down['datagrams']}",
        fontsize=9,
    )
    ax.set_ylabel("bytes (UDP payload + per-datagram overhead)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)

    ax = axes[1][1]
    detections = result["out_of_contact"]["detections"]
    labels = [f"{d['watcher'].split('@')[0]}\nsees {d['presentity'].split('@')[0]}" for d in detections]
    values = [d["detected_after_s"] if d["detected_after_s"] is not None else 0.0 for d in detections]
    colors = ["tab:blue" if d["detected_after_s"] is not None else "tab:red" for d in detections]
    if detections:
        ax.bar(range(len(detections)), values, color=colors)
        ax.set_xticks(range(len(detections)), labels, fontsize=7)
        for lease in sorted({d["lease_s"] for d in detections}):
            ax.axhline(lease, color="grey", linestyle="--", label=f"lease {lease} s")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no device vanished", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("seconds after vanishing (red: not seen)")
    ax.set_title("Time to see a vanished device out of contact")
    ax.grid(True, axis="y", alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
