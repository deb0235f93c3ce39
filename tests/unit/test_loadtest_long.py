"""The long bench's report: soak memory figures and goals, its files, its own README block."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest import bench
from loadtest.generator import StepSpec, step_result
from loadtest.longbench import README_LONG_END, README_LONG_START, soak_scenario, write_long_report
from loadtest.recording import StepRecorder, memory_growth
from loadtest.report import README_END, README_START

MACHINE = {"cpus": 2, "cpu_model": "test cpu", "memory_bytes": 2**34, "kernel": "Linux 6",
           "python": "3.11", "packages": {"grpcio": "1"}, "mosquitto": "2.0",
           "loadavg_start": [0.5, 0.4, 0.3]}  # fmt: skip


def _soak_result(edge_growth_per_s: float) -> dict[str, Any]:
    rec = StepRecorder(0, 100, 2500.0, t0_ns=0)
    for i in range(500):
        rec.scheduled += 1
        rec.on_sent(i * 400_000, 1, i * 400_000 + 100_000)
        rec.on_delivered(i * 400_000, i * 400_000 + 3_000_000)
    rss = [(float(t), {"core": 130.0, "edge": 200.0 + edge_growth_per_s * t, "generator": 80.0})
           for t in range(0, 1800, 10)]  # fmt: skip
    cpu = {n: {"user_s": 1.0, "system_s": 0.1, "cpu_percent": 40.0, "rss_mib": 1.0}
           for n in ("core", "edge", "generator")}  # fmt: skip
    step = step_result(rec, StepSpec(100, 1800.0, 10.0), 1805.0, 0, cpu, rss)
    return {
        "label": "edge", "path": "edge", "setup_s": 3.0, "payload_bytes": [100, 140],
        "steps": [step], "scenario": "soak", "memory_growth": memory_growth(rss, skip_s=13.0),
        "rss_timeline": [[t, row] for t, row in rss],
    }  # fmt: skip


def _report(tmp_path: Path, growth: float) -> dict[str, Any]:
    sc = soak_scenario()
    call = {"error": "RuntimeError: not measured in this test"}
    report, path = write_long_report(
        tmp_path, 0.0, MACHINE, {"separated": True, "sut_cpus": [0], "generator_cpus": [1]},
        {}, sc, [_soak_result(growth)], call,
    )  # fmt: skip
    assert json.loads(path.read_text())["kind"] == "bench-long"
    return report


def test_flat_soak_meets_the_memory_goal_and_the_files_are_written(tmp_path: Path) -> None:
    report = _report(tmp_path, 0.0)
    soak = report["figures"]["soak"]
    assert soak["memory_flat"] is True
    assert set(soak["memory_growth"]) == {"core", "edge", "generator"}
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["soak: memory of every system-under-test process flat"]["met"] is True
    assert goals["video: long call"]["met"] is False  # a failed measurement says so
    for name in ("latency-cdf", "throughput", "memory"):
        assert (tmp_path / report["plots"][name]).stat().st_size > 1000
    assert (tmp_path / "latest-long.json").exists() and (
        tmp_path / "latest-long-memory.png"
    ).exists()


def test_growing_edge_fails_the_goal_and_the_readme_block_is_its_own(tmp_path: Path) -> None:
    report = _report(tmp_path, 0.05)  # +90 MiB over 30 minutes
    edge = report["figures"]["soak"]["memory_growth"]["edge"]
    assert edge["growth_mib"] > 50 and edge["slope_mib_per_h"] == 180.0 and not edge["flat"]
    assert report["figures"]["soak"]["memory_flat"] is False
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\n{README_START}\nbench table\n{README_END}\n\n## Rest\n")
    bench.main(["--readme-from", str(tmp_path / "latest-long.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert f"{README_START}\nbench table\n{README_END}" in text  # the bench block untouched
    block = text[text.index(README_LONG_START) : text.index(README_LONG_END)]
    assert "| edge |" in block and "| NO |" in block and "30 minutes" in block
