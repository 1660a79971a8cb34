"""Bytes on the wire per operation: this gateway (CoAP + CBOR: plain, OSCORE, OSCORE + zstd) against
MQTT 3.1.1/5 (plain and TLS), XMPP over TLS and SIP SIMPLE, all on loopback.

``python -m benchmarks payload [--out DIR] [--systems a,b,...]``

Every figure is captured, not computed: each client talks to its server through a
counting relay (:mod:`benchmarks.peers.meter`) that books every datagram (UDP) or
``recv()`` chunk (TCP, TLS records included) to the scenario phase in which it moved
(:mod:`benchmarks.peers.content`). The numbers are application payload bytes: UDP
payload, or TCP payload. ``bytes_with_headers`` adds IPv4+UDP (28 B) per datagram,
or IPv4+TCP with timestamps (52 B) per chunk, which for TCP is a lower bound (pure
ACKs are not seen by a relay, and one chunk may be several segments).

Only the floor is computed: for each operation's main message, the smallest OSCORE
message that could carry its information (see :data:`FLOOR_INFO`).

Prints tables, writes ``payload.json`` and ``payload.png`` in ``--out`` (default
``var/bench``); the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2

from .peers import PeerUnavailable, SystemRun, content
from .peers.meter import summarise

OURS = "coap-oscore"
OURS_PLAIN = "coap-plain"
ZSTD = "coap-oscore-zstd"
SYSTEMS = ("coap-plain", "coap-oscore", ZSTD, "mqtt311", "mqtt5", "mqtt311-tls", "mqtt5-tls", "xmpp-tls", "sip-simple")
COLUMNS = SYSTEMS

LORAWAN_DR0 = 51  # EU868 DR0 (SF12/125 kHz) maximum FRMPayload, LoRaWAN Regional Parameters RP002
IEEE802154_USABLE = 80  # 127-byte PHY frame minus MAC header/FCS and compressed 6LoWPAN/UDP headers (approx.)

# The floor: CoAP header 4 B + 1-byte token + OSCORE option with a 1-byte Partial IV and a
# 1-byte kid counted as 3 B + payload marker 1 B + 8-byte tag, plus the operation's
# information as CBOR. (A real OSCORE message needs 2 B more: the option's delta/length
# byte and the encrypted inner code. The floor below leaves them out, as specified.)
FLOOR_OVERHEAD = 4 + 1 + 3 + 1 + 8
FLOOR_INFO: dict[str, tuple[str, bytes]] = {
    "subscribe": ("the presentity's identifier as CBOR text", cbor2.dumps(content.ALICE)),
    "publish": ("{0: 1 (OPEN), 1: note}", cbor2.dumps({0: 1, 1: content.NOTE})),
    "notify": ("{0: 1 (OPEN), 1: note} (the token names the subscription)", cbor2.dumps({0: 1, 1: content.NOTE})),
    "im20": ("[recipient, text]", cbor2.dumps([content.ALICE, content.IM20.encode()])),
    "ack": ("the acknowledged sequence number (uint 1)", cbor2.dumps(1)),
    "im140": ("[recipient, text]", cbor2.dumps([content.ALICE, content.IM140.encode()])),
}
# Our main message per operation: (phase, leg, direction, label).
MAIN_MESSAGE = {
    "subscribe": ("subscribe", "bob", "up", "Bob: GET /p/1 (contact 1: Alice), Observe 0"),
    "publish": ("publish", "alice", "up", "Alice: PUT /p"),
    "notify": ("publish", "bob", "down", "gateway: CON notification to Bob"),
    "im20": ("im20", "bob", "up", "Bob: POST /i/1"),
    "ack": ("ack", "alice", "up", "Alice: DELETE /i?c=1"),
    "im140": ("im140", "bob", "up", "Bob: POST /i/1"),
}


def _runners(workdir: Path) -> dict[str, Callable[[], Awaitable[SystemRun]]]:
    from .peers import coap_gateway, mqtt, sip, xmpp

    return {
        "coap-plain": lambda: coap_gateway.run("plain", workdir / "coap-plain"),
        "coap-oscore": lambda: coap_gateway.run("oscore", workdir / "coap-oscore"),
        ZSTD: lambda: coap_gateway.run("oscore-zstd", workdir / "coap-oscore-zstd"),
        "mqtt311": lambda: mqtt.run(4, False, workdir / "mqtt311"),
        "mqtt5": lambda: mqtt.run(5, False, workdir / "mqtt5"),
        "mqtt311-tls": lambda: mqtt.run(4, True, workdir / "mqtt311-tls"),
        "mqtt5-tls": lambda: mqtt.run(5, True, workdir / "mqtt5-tls"),
        "xmpp-tls": lambda: xmpp.run(workdir / "xmpp"),
        "sip-simple": lambda: sip.run(workdir / "sip"),
    }


async def run_systems(names: list[str], workdir: Path) -> tuple[dict[str, SystemRun], dict[str, str]]:
    runners = _runners(workdir)
    done: dict[str, SystemRun] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        started = time.monotonic()
        try:
            done[name] = await runners[name]()
        except PeerUnavailable as exc:
            unavailable[name] = f"could not be started: {exc}"
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            unavailable[name] = f"failed while running: {type(exc).__name__}: {exc}"
        print(f"# {name}: {'ok' if name in done else unavailable[name]} ({time.monotonic() - started:.1f} s)",
              file=sys.stderr)
    return done, unavailable


def per_operation(run: SystemRun) -> dict[str, dict[str, Any]]:
    out = {}
    for op, (phase, legs) in content.BOOKING.items():
        out[op] = summarise(run.meter.of(phase, legs))
    return out


def our_messages(run: SystemRun) -> dict[str, dict[str, Any]]:
    """Our main message per operation, every datagram of the operation, and the fits."""
    from .peers.coap_gateway import describe

    out: dict[str, dict[str, Any]] = {}
    for op, (phase, legs) in content.BOOKING.items():
        records = run.meter.of(phase, legs)
        datagrams = [
            {"leg": r.leg, "dir": r.direction, "size": r.size, "what": describe(r.data)} for r in records
        ]
        entry: dict[str, Any] = {"datagrams": datagrams, "largest": max((r.size for r in records), default=0)}
        if op in MAIN_MESSAGE:
            m_phase, leg, direction, label = MAIN_MESSAGE[op]
            main = [r for r in run.meter.of(m_phase, [leg]) if r.direction == direction]
            size = main[0].size if main else 0
            entry.update({
                "main": label,
                "main_bytes": size,
                "main_hex": main[0].data.hex() if main else "",
                "fits_lorawan_dr0": size <= LORAWAN_DR0,
                "fits_802154": size <= IEEE802154_USABLE,
                "all_fit_lorawan_dr0": entry["largest"] <= LORAWAN_DR0,
                "all_fit_802154": entry["largest"] <= IEEE802154_USABLE,
            })
        out[op] = entry
    return out


def floors(ours: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out = {}
    for op, (what, info) in FLOOR_INFO.items():
        floor = FLOOR_OVERHEAD + len(info)
        entry: dict[str, Any] = {"info": what, "info_bytes": len(info), "floor": floor}
        if ours is not None:
            entry["ours"] = ours[op]["main_bytes"]
            entry["ratio"] = round(ours[op]["main_bytes"] / floor, 3)
        out[op] = entry
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main_record_size(run: SystemRun | None, op: str) -> int | None:
    """Size of the first datagram/chunk of ``op``'s main message (phase, leg, direction)."""
    if run is None:
        return None
    phase, leg, direction, _ = MAIN_MESSAGE[op]
    found = [r.size for r in run.meter.of(phase, [leg]) if r.direction == direction]
    return found[0] if found else None


def targets(runs: dict[str, SystemRun], ops: dict[str, dict[str, Any]], ours_msgs: dict[str, dict[str, Any]] | None,
            floor: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ours = ops.get(OURS)

    def target(name: str, goal: str, measured: Any, met: bool | None, how: str) -> None:
        out.append({"target": name, "goal": goal, "measured": measured,
                    "status": "not measured" if met is None else ("met" if met else "not met"), "how": how})

    im_main = ours_msgs["im20"]["main_bytes"] if ours_msgs else None
    target("im20_oscore_bytes", "<= 50 B", im_main, None if im_main is None else im_main <= 50,
           "UDP payload of Bob's OSCORE POST carrying the 20-char IM (CoAP message only; +28 B IPv4/UDP)")
    xmpp = ops.get("xmpp-tls")
    for im in ("im20", "im140"):
        r = _ratio(ours[im]["bytes"], xmpp[im]["bytes"]) if ours and xmpp else None
        target(f"{im}_vs_xmpp_tls", "ours/XMPP-TLS <= 0.333", r, None if r is None else r <= 1 / 3,
               "all bytes of the IM operation, both legs, both directions (ours incl. the /o record notification)")
    sip = ops.get("sip-simple")
    r = _ratio(ours["notify"]["bytes"], sip["notify"]["bytes"]) if ours and sip else None
    target("notify_vs_sip", "ours/SIP <= 0.1", r, None if r is None else r <= 0.1,
           "presence notification to 1 watcher: notification + its ACK (ours) vs NOTIFY + 200 OK (SIP)")
    # A second reading of the two ratio targets: the main message alone (the IM as the
    # sender's link carries it; the notification as the watcher's link carries it).
    for name, op, other, goal in (("im20_msg_vs_xmpp_tls", "im20", "xmpp-tls", 1 / 3),
                                  ("im140_msg_vs_xmpp_tls", "im140", "xmpp-tls", 1 / 3),
                                  ("notify_msg_vs_sip", "notify", "sip-simple", 0.1)):
        mine = main_record_size(runs.get(OURS), op)
        theirs = main_record_size(runs.get(other), op)
        r = _ratio(mine, theirs)
        target(name, f"ours/{other} <= {goal:.3g} (second reading)", r, None if r is None else r <= goal,
               f"main message only: ours {mine} B vs {other} {theirs} B (first {MAIN_MESSAGE[op][3]} record)")
    ratios = {op: f["ratio"] for op, f in floor.items() if "ratio" in f}
    worst = max(ratios.values()) if ratios else None
    target("ours_over_floor", "<= 1.15 for every operation", ratios or None,
           None if worst is None else worst <= 1.15, "main message of each operation / floor (see floor)")
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: list[list[Any]], header: list[str], fmt: Callable[[Any], str] = _fmt) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(ops: dict[str, dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG"
    systems = [s for s in SYSTEMS if s in ops]
    names = list(content.OPERATIONS)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        values = [ops[system][op]["bytes"] for op in names]
        xs = [k + (i - (len(systems) - 1) / 2) * width for k in range(len(names))]
        ax.bar(xs, values, width, label=system)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("bytes per operation (UDP/TCP payload, log scale)")
    ax.set_title("Bytes on the wire per operation, captured on loopback")
    ax.set_ylim(bottom=10)
    ax.axhline(LORAWAN_DR0, color="grey", linestyle=":", linewidth=1)
    ax.text(-0.45, LORAWAN_DR0 * 1.05, "51 B: one LoRaWAN DR0 payload", fontsize=8, va="bottom", ha="left",
            color="grey")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def report(done: dict[str, SystemRun], unavailable: dict[str, str], out: Path) -> dict[str, Any]:
    ops = {name: per_operation(run) for name, run in done.items()}
    ours_msgs = our_messages(done[OURS]) if OURS in done else None
    plain_msgs = our_messages(done[OURS_PLAIN]) if OURS_PLAIN in done else None
    floor = floors(ours_msgs)
    goals = targets(done, ops, ours_msgs, floor)
    zstd_msgs = our_messages(done[ZSTD]) if ZSTD in done else None
    columns = [c for c in COLUMNS if c in done]
    rows_ops = [*content.OPERATIONS, "setup"]

    def cell(system: str, op: str, key: str = "bytes") -> Any:
        return ops[system][op][key] if system in ops else None

    print("Bytes per operation (application payload: UDP payload, or TCP payload incl. TLS records; both directions, "
          "every leg booked to the operation)")
    print(table([[op, *(cell(s, op) for s in columns)] for op in rows_ops], ["operation", *columns]))
    print()
    print("Same, with IPv4+UDP headers (28 B/datagram) or IPv4+TCP headers (52 B/recv chunk; lower bound)")
    print(table([[op, *(cell(s, op, "bytes_with_headers") for s in columns)] for op in rows_ops],
                ["operation", *columns]))
    print()
    ratio_cols = [c for c in columns if c != OURS]
    ratios: dict[str, dict[str, float | None]] = {}
    for system in ratio_cols:
        ratios[system] = {op: _ratio(cell(OURS, op), cell(system, op)) if OURS in ops else None
                          for op in content.OPERATIONS}
    print("Ratio ours (coap-oscore) / each, per operation (smaller is better)")
    print(table([[op, *(ratios[s][op] for s in ratio_cols)] for op in content.OPERATIONS], ["operation", *ratio_cols]))
    print()
    if ours_msgs is not None:
        rows = []
        for op in content.OPERATIONS:
            m = ours_msgs[op]
            plain = plain_msgs[op]["main_bytes"] if plain_msgs else None
            zstd = zstd_msgs[op]["main_bytes"] if zstd_msgs else None
            rows.append([op, m["main"], plain, m["main_bytes"], zstd, floor[op]["floor"], floor[op]["ratio"],
                         "yes" if m["fits_lorawan_dr0"] else "no", "yes" if m["fits_802154"] else "no",
                         m["largest"], "yes" if m["all_fit_lorawan_dr0"] else "no",
                         "yes" if m["all_fit_802154"] else "no"])
        print("Our main message per operation (UDP payload) against the floor and the link frames "
              f"(floor = {FLOOR_OVERHEAD} B + CBOR information; LoRaWAN DR0 {LORAWAN_DR0} B; "
              f"802.15.4 ~{IEEE802154_USABLE} B)")
        print(table(rows, ["operation", "message", "plain", "oscore", "oscore+zstd", "floor", "ours/floor", "DR0",
                           "802.15.4",
                           "largest dgram", "all DR0", "all 802.15.4"]))
        print()
    print("Targets")
    print(table([[g["target"], g["goal"], json.dumps(g["measured"]), g["status"]] for g in goals],
                ["target", "goal", "measured", "status"]))
    if unavailable:
        print()
        for name, why in unavailable.items():
            print(f"not measured: {name}: {why}")

    out.mkdir(parents=True, exist_ok=True)
    png = out / "payload.png"
    plot_problem = plot(ops, png)
    detail = {
        "benchmark": "payload",
        "unit": "bytes of application payload (UDP payload; TCP payload incl. TLS records)",
        "scenario": content.__doc__,
        "content": {"note": content.NOTE, "im20": content.IM20, "im140": content.IM140,
                    "im140_utf8_bytes": len(content.IM140.encode()), "msg_id_bytes": len(content.IM20_ID)},
        "booking": {op: {"phase": p, "legs": legs or "all"} for op, (p, legs) in content.BOOKING.items()},
        "systems": {
            name: {"how": run.how, "notes": run.notes, "transport": run.transport, **run.extra, "operations": ops[name]}
            for name, run in done.items()
        },
        "ours_messages": {"oscore": ours_msgs, "plain": plain_msgs, "oscore_zstd": zstd_msgs},
        "floor": {"overhead": FLOOR_OVERHEAD, "definition": "CoAP header 4 + token 1 + OSCORE option 3 + payload "
                  "marker 1 + tag 8 + CBOR information (a real OSCORE message needs 2 B more: option header byte "
                  "and inner code)", "operations": floor},
        "ratios_ours_oscore_to": ratios,
        "targets": goals,
        "unavailable": unavailable,
        "png": None if plot_problem else str(png),
    }
    (out / "payload.json").write_text(json.dumps(detail, indent=1, ensure_ascii=False))
    bytes_per_op: dict[str, Any] = {
        s: {op: ops[s][op]["bytes"] for op in content.OPERATIONS} for s in COLUMNS if s in ops
    }
    summary: dict[str, Any] = {
        "benchmark": "payload",
        "unit": "bytes (UDP payload / TCP payload incl. TLS), per operation, both directions",
        "bytes": bytes_per_op,
        "ours_main_message": {op: ours_msgs[op]["main_bytes"] for op in content.OPERATIONS} if ours_msgs else None,
        "floor": {op: f["floor"] for op, f in floor.items()},
        "ratios_ours_oscore_to": ratios,
        "targets": {g["target"]: {"goal": g["goal"], "measured": g["measured"], "status": g["status"]} for g in goals},
        "unavailable": unavailable,
        "json": str(out / "payload.json"),
        "png": None if plot_problem else str(png),
    }
    if plot_problem:
        print(f"note: {plot_problem}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks payload", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/bench"), help="directory for payload.json/.png")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="bench-payload-") as tmp:
        done, unavailable = asyncio.run(run_systems(names, Path(tmp)))
    summary = report(done, unavailable, args.out)
    print(json.dumps(summary, ensure_ascii=False, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
