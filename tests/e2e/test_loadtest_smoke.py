"""The ci-smoke scenario end to end: real LocalMesh, echo relay and Mosquitto; the report is whole."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.report import LATENCY_FIGURES, ROW_FIGURES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="the MQTT baseline needs the mosquitto binary",
    ),
]


@pytest.mark.timeout(180)
def test_ci_smoke_report_holds_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.cli", "run", "ci-smoke", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "latest-ci-smoke.json").read_text())

    for key in (
        "cpus",
        "memory_bytes",
        "cpu_model",
        "kernel",
        "python",
        "mosquitto",
        "loadavg_start",
    ):
        assert report["machine"][key], key
    for dist in ("grpcio", "protobuf", "paho-mqtt"):
        assert report["machine"]["packages"][dist] != "not installed"
    assert "persistence false" in report["systems"]["mosquitto_config"]
    assert set(report["pinning"]) >= {"sut_cpus", "generator_cpus", "separated"}

    rows = {r["path"]: r for r in report["runs"]}
    assert set(rows) == {"edge", "echo", "mqtt-qos0", "mqtt-qos1"}
    for path, r in rows.items():
        for key in ROW_FIGURES:
            assert isinstance(r[key], int | float) and math.isfinite(r[key]), (path, key)
        for key in LATENCY_FIGURES:
            assert math.isfinite(r["latency_ms"][key]), (path, key)
        assert r["sent"] > 0, path
        assert r["latency_ms"]["p50"] > 0, path
        assert "generator" in r["cpu"], path
        assert r["timeline"] and r["latency_cdf_ms"], path
    assert {"core", "edge"} <= set(rows["edge"]["cpu"])
    assert "echo" in rows["echo"]["cpu"] and "mosquitto" in rows["mqtt-qos0"]["cpu"]
    # Light load: the edge path delivers every batch it was sent, once.
    edge = rows["edge"]
    assert edge["delivered"] == edge["sent"] == edge["expected"]
    assert edge["duplicates"] == 0

    stem = Path(report["plots"]["latency-cdf"]).name.removesuffix("-latency-cdf.png")
    assert (out / f"{stem}.html").exists() and (out / "latest-ci-smoke.html").exists()
    for name in ("latency-cdf", "latency-vs-load", "throughput", "drops"):
        assert (out / report["plots"][name]).stat().st_size > 1000, name
