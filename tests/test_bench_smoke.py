"""The benchmarks cannot rot: their quick modes run in CI and every point must produce numbers.
(Speed targets live in the benchmarks' own reports, not in a timed test.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POINTS = ("c1", "c64", "c64_stream", "c64_responses_stream", "c64_messages_stream")


def test_quick_benchmark_measures_every_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    for target in ("direct", "bare", "gateway"):
        point = report["targets"][target]
        for name in POINTS:
            assert point[name]["requests"] > 0 and point[name]["errors"] == 0, (target, name, point[name])
            assert point[name]["rps"] > 0 and point[name]["p50_ms"] > 0 and point[name]["p99_ms"] > 0
        for name in ("first_byte", "first_byte_responses", "first_byte_messages"):
            assert point[name]["p50_ms"] > 0, (target, name)
    # Every target relays the same stream (the gateway drops chat's usage chunk, not asked for),
    # and an agent API's answer carries more events than chat's.
    events = report["events_per_stream"]
    for name in ("c64_stream", "c64_responses_stream", "c64_messages_stream"):
        direct, bare, gateway = (events[name][target] for target in ("direct", "bare", "gateway"))
        assert direct > 20 and bare == direct and direct - 1 <= gateway <= direct, (name, events[name])
    assert events["c64_responses_stream"]["gateway"] > events["c64_stream"]["gateway"]
    assert events["c64_messages_stream"]["gateway"] > events["c64_stream"]["gateway"]
    rss = report["rss_mb"]
    assert all(rss[k] > 0 for k in ("gateway_idle", "gateway_slow_streams", "gateway_peak"))
    assert report["slow_streams"]["completed"] == report["slow_streams"]["count"]
    assert report["soak"]["requests"] > 0 and not math.isnan(report["soak"]["growth_pct"])
    assert all(not math.isnan(v) for v in report["summary"].values())
    for point in POINTS:  # CPU per request of both proxies, measured from /proc
        assert all(report["cpu_us_per_request"][point][name] > 0 for name in ("bare", "gateway", "redis")), point
    table = (tmp_path / "latest.md").read_text()
    assert "gateway / bare" in table and "RSS idle" in table
    assert "Responses streams/s" in table and "Messages streams/s" in table


def test_quick_ab_measures_both_versions_on_every_point(tmp_path: Path) -> None:
    """bench.ab runs a commit (checked out from git) against the working tree, one round each in turn."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--before", "HEAD", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "ab.json").read_text())
    assert set(report["points"]) == {"c64", "c64_stream", "c64_responses_stream", "c64_messages_stream"}
    for point, figures in report["points"].items():
        for version in ("before", "after"):
            assert len(figures[version]["rps_all"]) == report["rounds"] == 2, (point, version)
            assert figures[version]["rps"] > 0 and figures[version]["cpu_us"] > 0, (point, version)
        assert 0 < figures["rps_after_over_before"] < 10 and 0 < figures["cpu_after_over_before"] < 10, point
    assert "after / before" in (tmp_path / "ab.md").read_text()


def test_quick_redis_client_benchmark_measures_every_client(tmp_path: Path) -> None:
    """bench/redis_client.py: both clients (and redis-py's pipeline) at both points, with numbers."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI must install it)")
        pytest.skip("redis-server is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "bench.redis_client", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "redis_client.json").read_text())
    assert report["command"] == {"checks": 8, "keys": 5, "arguments": 6 + 8 + 3 * 8}
    for point in ("c1", "c64"):
        rows = report["points"][point]
        assert set(rows) == {"resp", "redis-py", "redis-py pipeline"}
        for client, row in rows.items():
            assert row["calls"] > 0 and row["cpu_us_per_call"] > 0 and row["calls_per_s"] > 0, (point, client)
        assert rows["redis-py"]["cpu_vs_resp"] > 0 and not math.isnan(rows["redis-py"]["cpu_vs_resp"])
    assert "| c64 | redis-py |" in (tmp_path / "redis_client.md").read_text()
