"""The ci-smoke scenario end to end: a real LocalMesh, echo relay, Mosquitto and placement core.

Twenty seconds of load (four paths, two steps of 2.5 s each) and a small placement run; the
report must hold every figure issue 7 names — maximum sustainable rate, edge/echo ratio, edge
against Mosquitto QoS 0 and QoS 1 at equal load, placement p99, memory growth — each a real
number that can be traced to this run's own rows.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.report import LATENCY_FIGURES, ROW_FIGURES

pytestmark = pytest.mark.slow

PATHS = ("edge", "echo", "mqtt-qos0", "mqtt-qos1")
SUT = {"edge": {"core", "edge"}, "echo": {"echo"}, "mqtt-qos0": {"mosquitto"},
       "mqtt-qos1": {"mosquitto"}}  # fmt: skip


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(300)
def test_ci_smoke_report_holds_every_figure(tmp_path: Path) -> None:
    assert shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists(), (
        "the MQTT baseline needs Mosquitto: `make mosquitto` (scripts/install_debian.sh)"
    )
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.cli", "run", "ci-smoke", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "latest-ci-smoke.json").read_text())

    m = report["machine"]
    for key in ("cpus", "memory_bytes", "cpu_model", "kernel", "python", "mosquitto"):
        assert m[key], key
    assert re.fullmatch(r"[0-9a-f]{40}", m["code"]["commit"])
    for dist in ("grpcio", "protobuf", "paho-mqtt", "scipy", "aiosqlite", "sqlalchemy",
                 "aiortc", "av", "opencv-python-headless"):  # fmt: skip
        assert m["packages"][dist] != "not installed", dist
    assert "persistence false" in report["systems"]["mosquitto_config"]
    assert set(report["pinning"]) >= {"sut_cpus", "generator_cpus", "separated"}

    runs = report["runs"]
    by = {(r["path"], r["patients"]): r for r in runs if not r.get("retry")}
    for path in PATHS:
        for n in (4, 8):
            r = by[(path, n)]
            for key in ROW_FIGURES:
                assert _number(r[key]), (path, n, key)
            for key in LATENCY_FIGURES:
                assert _number(r["latency_ms"][key]), (path, n, key)
            assert r["sent"] > 0 and r["latency_ms"]["p50"] > 0, (path, n)
            assert SUT[path] | {"generator"} <= set(r["cpu"]), (path, n)
            assert r["timeline"] and r["latency_cdf_ms"], (path, n)
    # Light load: the edge path sends and delivers every batch, once.
    for n in (4, 8):
        edge = by[("edge", n)]
        assert edge["not_sent"] == 0 and edge["delivered"] == edge["sent"] == edge["expected"]
        assert edge["duplicates"] == 0
        assert edge["server"]["accepted"] == edge["sent"]  # the edge's own counter agrees

    f = report["figures"]
    # Maximum sustainable rate per path: a level this run passed (a lower bound here).
    for path in PATHS:
        ms = f["max_sustainable"][path]
        assert _number(ms["batches_per_s"]) and ms["batches_per_s"] > 0, path
        assert ms["kind"] in ("ceiling", "lower_bound"), path
        assert any(
            r["path"] == path and r["passes"] and r["target_batches_per_s"] == ms["batches_per_s"]
            for r in runs
        ), path
    ratio = f["max_sustainable_edge_to_echo_ratio"]
    expected = (
        f["max_sustainable"]["edge"]["batches_per_s"]
        / f["max_sustainable"]["echo"]["batches_per_s"]
    )
    assert ratio["value"] == pytest.approx(expected, abs=0.001)
    # The edge against Mosquitto at equal load, both QoS, from the rows of that load.
    for n in (4, 8):
        level = f["equal_load"][f"{n}_patients"]
        assert set(level["paths"]) == set(PATHS)
        assert _number(level["edge_to_echo_throughput_ratio"]["value"])
        for q in ("mqtt-qos0", "mqtt-qos1"):
            cmp = level[f"edge_vs_{q}"]
            edge_row = next(r for r in runs if r["path"] == "edge" and r["patients"] == n
                            and r["latency_ms"]["p99"] == cmp["edge_p99_ms"])  # fmt: skip
            assert edge_row["latency_ms"]["p50"] == cmp["edge_p50_ms"]
            assert _number(cmp[f"{q}_p99_ms"]) and cmp[f"{q}_p99_ms"] > 0
            assert cmp["edge_p99_no_worse"] in (True, False, None)
    # Placement: Opens against a real core holding 50 edges and 5,000 live sessions.
    pl = f["placement"]
    assert (pl["edges"], pl["live_sessions"]) == (50, 5000)
    assert pl["opens"] == 100 and not pl["errors"]
    assert (
        _number(pl["latency_ms"]["p99"]) and pl["latency_ms"]["p99"] >= pl["latency_ms"]["p50"] > 0
    )
    # Memory growth of every process of every path, from RSS sampled over the run.
    for path in PATHS:
        procs = f["memory_growth"][path]
        assert SUT[path] | {"generator"} <= set(procs), path
        for name, g in procs.items():
            assert g["samples"] >= 2 and g["first_mib"] > 0, (path, name)
            for key in ("growth_mib", "growth_percent", "slope_mib_per_h"):
                assert _number(g[key]), (path, name, key)
    assert f["memory_flat"] in (True, False)

    stem = Path(report["plots"]["latency-cdf"]).name.removesuffix("-latency-cdf.png")
    assert (out / f"{stem}.html").exists() and (out / "latest-ci-smoke.html").exists()
    for name in ("latency-cdf", "latency-vs-load", "throughput", "drops"):
        assert (out / report["plots"][name]).stat().st_size > 1000, name
