"""Smoke test of ``python -m benchmarks link``: a real run at a tiny size (3 IMs and 3 presence
changes, ``lan`` profile) for our gateway and Mosquitto, through real network namespaces,
TUN devices and processes. Needs root, ``ip netns`` and ``/dev/net/tun``: skipped otherwise,
with the reason. About 8 s."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.tun import NETNS_PREFIX, packet_link_unavailable

ROOT = Path(__file__).resolve().parent.parent
COUNT = 3


def _impp_namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith(f"{NETNS_PREFIX}-")}


@pytest.mark.slow
def test_link_benchmark_ours_and_mosquitto_over_lan(tmp_path: Path) -> None:
    reason = packet_link_unavailable(probe=True)
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "benchmarks", "link", "--profile", "lan", "--count", str(COUNT),
            "--systems", "ours,mqtt", "--out", str(out)]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        try:
            stdout, stderr = run.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            run.terminate()  # SIGTERM: the benchmark ends its processes and deletes its namespaces
            try:
                stdout, stderr = run.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                run.kill()
                stdout, stderr = run.communicate()
            pytest.fail(f"the benchmark took over 45 s; stderr:\n{stderr[-3000:]}")
    print(stdout[-3000:])
    assert run.returncode == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    assert not {name for name in _impp_namespaces() if f"-{run.pid:x}-" in name}  # all it made is gone

    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "link"
    assert (summary["profile"], summary["count"]) == ("lan", COUNT)
    assert summary["policy"]["window"] == 1
    for name in ("ours", "mqtt"):
        figures = summary["systems"][name]
        assert figures["status"] == "ok", (name, figures["status"], stderr[-3000:])
        assert figures["delivery_ratio"] == 1.0, name
        assert figures["duplicates"] == 0, name
        assert figures["total_s"] > 0
        latency = figures["latency_s"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] < figures["total_s"]
        for kind in ("im", "presence"):
            assert figures[kind]["delivery_ratio"] == 1.0, (name, kind)
            assert figures[kind]["bytes_up"] > 0 and figures[kind]["bytes_down"] > 0, (name, kind)
        link = figures["link"]
        assert link["packets_up"] >= 2 * COUNT and link["packets_down"] >= 2 * COUNT  # at least one packet per item
        assert link["bytes_up"] >= 28 * link["packets_up"]  # IP bytes: every packet has at least its headers
    ratios = summary["ratios_ours_to"]["mqtt"]
    assert ratios["total_s"] > 0 and ratios["bytes"] > 0

    detail = json.loads((out / "link.json").read_text())
    ours = detail["systems"]["ours"]
    assert ours["info"]["coap"]["security"] == "OSCORE"
    assert len(ours["im"]["latencies_s"]) == COUNT
    assert set(ours["phases"]) == {"setup", "im", "presence", "teardown"}
    if summary["png"] is not None:
        assert (out / "link.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
