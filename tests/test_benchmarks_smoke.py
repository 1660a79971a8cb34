"""The throughput benchmark runs end to end at tiny sizes: every phase works, the last
stdout line is the JSON summary, and the PNG and JSON files are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("IMPP_TEST_REDIS", "redis://127.0.0.1:6379/0")
STATUSES = {"met", "not met", "inconclusive", "unmeasurable on this machine", "not measured"}


def _redis_reachable() -> bool:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the benchmark plots with matplotlib")
    have_redis = _redis_reachable()
    if not have_redis and os.environ.get("CI"):
        pytest.fail(f"Redis at {REDIS_URL} is not reachable (CI must start it)")
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "benchmarks", "throughput", "--smoke", "--out", str(out),
            "--redis", REDIS_URL if have_redis else "none"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"

    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["benchmark"] == "throughput"
    assert summary["profile"] == "smoke"
    assert not summary.get("errors")
    im = summary["im"]
    for key in ("bare", "gateway_1w", *(("gateway_2w",) if have_redis else ())):
        assert im[key]["rate_per_s"] > 0, key
        assert im[key]["error_codes"] == {} and im[key]["failures"] == {}, key
    for key in ("gateway_1w", *(("gateway_2w",) if have_redis else ())):
        assert im[key]["stored_equals_accepted"], (key, im[key]["stored"], im[key]["ok_total"])
    assert summary["presence"]["gateway_1w"]["notifications_per_s"] > 0
    assert {int(n) for n in summary["fanout"]} == {1, 3}
    assert all(row["median_s"] > 0 for row in summary["fanout"].values())
    assert summary["memory"]["observations"] == 4
    assert summary["registration"]["sqlite"]["gateway_sees_last_entity"] is True
    assert summary["duplicate_cache"]["exchange_lifetime_s"] == 247.0
    bounded = summary["duplicate_cache"]["bounded"]
    assert bounded["exchange_lifetime_s"] == 1.0 and bounded["rate_per_s"] > 0
    assert summary["duplicate_cache"]["gateway_knob"].startswith("--exchange-lifetime")
    assert set(summary["targets"]) == {
        "gateway_vs_bare_im_rate", "two_vs_one_worker_im_rate", "fanout_1000_s", "duplicate_cache_bounded"
    }
    assert all(t["status"] in STATUSES for t in summary["targets"].values())
    assert summary["targets"]["fanout_1000_s"]["status"] == "not measured"  # smoke sizes have 3 watchers
    assert summary.get("redis_keys_deleted", 0) >= (1 if have_redis else 0)

    png = out / "throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "throughput.json").read_text())
    assert written["im"]["bare"]["rate_per_s"] == im["bare"]["rate_per_s"]
    assert "IMs/s" in proc.stdout  # the table precedes the JSON line
