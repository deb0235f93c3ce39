"""Report building: rows, figures, goals, JSON/HTML/PNG output and the README markers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench import figures_and_goals, max_sustainable, readme_body
from loadtest.generator import (
    GeneratorSpec,
    StepRecorder,
    StepSpec,
    Swarm,
    step_passes,
    step_result,
)
from loadtest.plots import all_plots
from loadtest.recording import Segment
from loadtest.report import (
    README_END,
    README_START,
    ROW_FIGURES,
    base_report,
    finite_numbers,
    rows_of,
    summary_table,
    update_readme,
    write_html,
    write_json,
)


def _step(
    patients: int, delivered_us: list[int], lost: int = 0, gen_cpu: float = 24.0
) -> dict[str, Any]:
    rec = StepRecorder(0, patients, patients * 25.0, t0_ns=0)
    for i, us in enumerate(delivered_us):
        sched = i * 40_000_000
        rec.scheduled += 1
        rec.on_sent(sched, 1, sched + 500_000)
        rec.on_delivered(sched, sched + us * 1000)
    rec.scheduled += lost
    for _ in range(lost):
        rec.on_sent(0, 1, 0)
        rec.on_undelivered(0, 3_000_000_000)
    cpu = {"edge": {"user_s": 1.0, "system_s": 0.5, "cpu_percent": 30.0, "rss_mib": 100.0},
           "generator": {"user_s": 1.0, "system_s": 0.2, "cpu_percent": gen_cpu, "rss_mib": 60.0}}  # fmt: skip
    rss = [(float(t), {"edge": 100.0 + t, "generator": 60.0}) for t in range(6)]
    return step_result(rec, StepSpec(patients, 5.0), 5.0, 0, cpu, rss)


def _result(label: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "label": label,
        "path": label,
        "setup_s": 0.5,
        "payload_bytes": [101, 139],
        "steps": steps,
        "memory_growth": {"edge": {"first_mib": 100.0, "last_mib": 103.0, "growth_mib": 3.0,
                                   "growth_percent": 3.0, "slope_mib_per_h": 1.0,
                                   "window_s": 1.0, "span_s": 5.0, "samples": 6}},
    }  # fmt: skip


def test_step_result_counts_latency_and_loss() -> None:
    s = _step(10, [1000, 2000, 3000, 40_000], lost=1)
    assert (s["sent"], s["expected"], s["delivered"], s["lost"]) == (5, 5, 4, 1)
    assert s["loss_ratio"] == pytest.approx(0.2)
    # Five samples: 1, 2, 3, 40 ms delivered and the undelivered one at >= 3 s.
    assert s["latency_ms"]["p50"] == pytest.approx(3.0, rel=0.01)
    # The undelivered one counts at its lower bound (3 s), so max is one too.
    assert s["latency_ms"]["max"] == pytest.approx(3000.0, rel=0.01)
    assert s["latency_lower_bound"]["max"] and not s["latency_lower_bound"]["p50"]
    assert s["generator_send_lag_ms"]["p50"] == pytest.approx(0.5, rel=0.02)
    assert s["latency_cdf_ms"][-1][1] == 100.0
    assert not step_passes(s, 50.0)  # one batch lost
    assert step_passes(_step(10, [1000, 2000]), 50.0)
    assert not step_passes(_step(10, [1000, 60_000]), 50.0)
    assert s["memory_growth"]["edge"]["growth_mib"] > 0
    assert (
        not s["generator_bound"]["bound"]
        and _step(10, [1], gen_cpu=95.0)["generator_bound"]["bound"]
    )


def test_rows_hold_every_figure_and_only_finite_numbers() -> None:
    rows = rows_of(
        [_result("edge", [_step(100, [1500, 2500])]), _result("echo", [_step(100, [900])])]
    )
    assert [r["name"] for r in rows] == ["edge@100", "echo@100"]
    for r in rows:
        for key in ROW_FIGURES:
            assert isinstance(r[key], int | float) and math.isfinite(r[key])
        assert r["sut_cpu_percent"] == 30.0 and r["generator_cpu_percent"] == 24.0
    assert finite_numbers(rows) == []
    table = summary_table(rows)
    assert table[0][0] == "run" and len(table) == 3


def test_write_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        write_json({"runs": [{"x": float("nan")}]}, tmp_path / "r.json")


def test_duplicates_are_not_counted_as_deliveries() -> None:
    spec = GeneratorSpec(
        label="echo", path="echo", target="", batch_rate_hz=25, ecg_hz=250, vitals_rate_hz=1,
        steps=[StepSpec(1, 1.0)], viewers=1, watched=1,
    )  # fmt: skip
    swarm = Swarm(spec)
    swarm.patients = [swarm.new_patient(0, "s")]
    rec = StepRecorder(0, 1, 25.0, 0)
    swarm.patients[0].segments.append(Segment(1, 0, 40_000_000, 1, rec, sent=1))
    swarm.deliver(0, 0, 1, 1_000_000)
    swarm.deliver(0, 0, 1, 2_000_000)
    swarm.deliver(0, 0, 7, 2_000_000)  # never sent
    assert (rec.delivered, rec.duplicates, swarm.stray) == (1, 1, 1)


def _bench_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results = [
        _result(label, [_step(n, [500 * (i + 1) for i in range(20)])])
        for n in (100, 500)
        for label in ("edge", "echo", "mqtt-qos0", "mqtt-qos1")
    ]
    ramp = [
        _result("edge", [_step(20, [1000]), _step(40, [90_000])]),
        _result("echo", [_step(20, [1000]), _step(40, [1000]), _step(80, [70_000])]),
    ]
    ramp_rows = rows_of(ramp)
    for r in ramp_rows:
        r["passes"] = step_passes(r, 50.0)
    return rows_of(results), ramp_rows


def test_bench_figures_and_goals() -> None:
    rows, ramp_rows = _bench_rows()
    placement = {"edges": 1000, "live_sessions": 100_000,
                 "latency_ms": {"p50": 1.0, "p99": 2.0, "p999": 3.0, "max": 4.0},
                 "server": {"decision": {"count": 501, "p50_le_us": 10.0, "p99_le_us": 2500.0}}}  # fmt: skip
    figs, goals = figures_and_goals(rows, ramp_rows, placement)
    # Neither path saturated at equal load: the ratio is 1 and says nothing about capacity.
    eq = figs["issue2"]["100_patients"]["edge_to_echo_throughput_ratio"]
    assert (eq["value"], eq["bound"]) == (1.0, "not_saturated")
    assert set(figs["issue2"]["500_patients"]) >= {"edge", "echo", "mqtt-qos0", "mqtt-qos1"}
    q1 = figs["issue2"]["100_patients"]["edge_vs_mqtt-qos1"]
    assert q1["edge_p99_ms"] == q1["mqtt-qos1_p99_ms"] and q1["edge_p99_no_worse"] is True
    sat = figs["max_sustainable_p99_under_50ms"]
    assert (sat["edge"]["patients"], sat["edge"]["kind"]) == (20, "ceiling")
    assert (sat["echo"]["patients"], sat["echo"]["kind"]) == (40, "ceiling")
    r = figs["max_sustainable_edge_to_echo_ratio"]
    assert (r["value"], r["bound"]) == (0.5, "exact")
    by_name = {g.name: g for g in goals}
    assert by_name["edge p99 at 100 patients"].met is True
    assert by_name["edge delivered/s as share of echo (100 patients)"].met is None
    assert by_name["edge max sustainable as share of echo's"].met is False
    # The goal is the decision's (2.5 ms bucket bound >= 1 ms); the whole Open is reported only.
    assert by_name["placement decision p99, 1,000 edges + 100,000 live sessions"].met is False
    assert by_name["Open RPC p99 (gRPC + placement + store commit), same state"].met is None
    assert max_sustainable([], "edge")["batches_per_s"] == 0.0


def test_a_generator_bound_failure_makes_the_maximum_a_lower_bound_and_the_ratio_a_bound() -> None:
    rows, _ = _bench_rows()
    ramp = [
        _result("edge", [_step(20, [1000]), _step(40, [90_000])]),
        # The echo's first failing level had the generator at 95%: not the echo's ceiling.
        _result("echo", [_step(20, [1000]), _step(40, [1000]), _step(80, [70_000], gen_cpu=95.0)]),
    ]
    ramp_rows = rows_of(ramp)
    for r in ramp_rows:
        r["passes"] = step_passes(r, 50.0)
    figs, goals = figures_and_goals(rows, ramp_rows, {})
    echo = figs["max_sustainable_p99_under_50ms"]["echo"]
    assert echo["kind"] == "lower_bound" and "generator-bound" in echo["why"]
    r = figs["max_sustainable_edge_to_echo_ratio"]
    # The echo could do more than measured: edge/echo is at most 50%, so below the 70% goal.
    assert (r["value"], r["bound"]) == (0.5, "upper_bound")
    assert {g.name: g for g in goals}["edge max sustainable as share of echo's"].met is False
    body = readme_body({"figures": figs, "goals": [], "started_utc": "t", "elapsed_s": 1.0,
                        "machine": {"cpus": 2, "cpu_model": "c", "memory_bytes": 2**30,
                                    "kernel": "k", "python": "3", "packages": {},
                                    "mosquitto": "2", "loadavg_start": [0.1]}}, ramp_rows)  # fmt: skip
    assert "echo ≥1000" in body and "≤50%" in body
    # A failure while other processes took the SUT's CPU is not its ceiling either.
    shared = rows_of([_result("edge", [_step(20, [1000]), _step(40, [90_000])])])
    shared[1]["cpu_contention"] = {"sut_cpus": {"busy_percent": 100.0, "others_percent": 60.0}}
    for r in shared:
        r["passes"] = step_passes(r, 50.0)
    m = max_sustainable(shared, "edge")
    assert m["kind"] == "lower_bound" and "60% of the system-under-test CPU" in m["why"]
    # A ramp that never failed: a lower bound too.
    never = rows_of([_result("edge", [_step(20, [1000])])])
    never[0]["passes"] = True
    assert max_sustainable(never, "edge")["kind"] == "lower_bound"


def test_generator_bound_rows_are_named_in_the_table_and_notes() -> None:
    rows = rows_of([_result("echo", [_step(500, [1000], gen_cpu=96.0)])])
    table = summary_table(rows)
    assert table[0][-1] == "notes" and table[1][-1] == "generator-bound"
    report = base_report(
        title="t", kind="bench", machine={}, pinning={}, systems={}, scenarios=[], rows=rows,
        started_utc="", finished_utc="", elapsed_s=1.0,
    )  # fmt: skip
    assert any("echo@500: generator-bound" in n for n in report["notes"])


def test_lower_bound_latencies_are_printed_with_a_sign() -> None:
    rows = rows_of([_result("edge", [_step(10, [1000, 2000], lost=3)])])
    table = summary_table(rows)
    p99, mx = table[1][5], table[1][7]
    assert p99.startswith("≥") and mx.startswith("≥")
    assert not table[1][4].startswith("≥") or rows[0]["latency_lower_bound"]["p50"]


def test_report_files_and_readme_table(tmp_path: Path) -> None:
    rows, ramp_rows = _bench_rows()
    machine = {"cpus": 2, "cpu_model": "test cpu", "memory_bytes": 2**34, "kernel": "Linux 6",
               "python": "3.11", "packages": {"grpcio": "1"}, "mosquitto": "2.0",
               "loadavg_start": [0.5, 0.4, 0.3]}  # fmt: skip
    report = base_report(
        title="t", kind="bench", machine=machine, pinning={"separated": True, "sut_cpus": [0],
        "generator_cpus": [1]}, systems={}, scenarios=[], rows=rows, started_utc="2026-01-01T00:00:00Z",
        finished_utc="2026-01-01T00:05:00Z", elapsed_s=300.0,
    )  # fmt: skip
    figs, goals = figures_and_goals(rows, ramp_rows, {})
    report["figures"], report["goals"] = figs, [g.to_dict() for g in goals]
    plots = all_plots(tmp_path / "bench", rows, [*rows, *ramp_rows], rows[:2], rows)
    assert all(p.stat().st_size > 1000 for p in plots.values())
    write_json(report, tmp_path / "r.json")
    write_html(report, tmp_path / "r.html", {k: p for k, p in plots.items()})
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["name"] == "edge@100"
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "edge@100" in page

    readme = tmp_path / "README.md"
    update_readme(readme, readme_body(report, rows))
    assert readme.read_text().startswith(README_START)
    readme.write_text("# Title\n\nintro\n\n" + readme.read_text() + "\n## After\nkept\n")
    update_readme(readme, "new body")
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n") and text.endswith("## After\nkept\n")
    assert f"{README_START}\nnew body\n{README_END}" in text and "edge@100" not in text


def test_readme_without_markers_gets_them_appended(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Someone else's README\n")
    update_readme(readme, "table")
    assert readme.read_text() == f"# Someone else's README\n\n{README_START}\ntable\n{README_END}\n"


def test_a_level_that_passes_on_retry_counts_and_the_first_all_failing_level_caps() -> None:
    def row(patients: int, passes: bool) -> dict[str, Any]:
        lat = {"p99": 10.0 if passes else 90.0}
        return {"label": "edge", "patients": patients, "target_batches_per_s": patients * 25.0,
                "passes": passes, "latency_ms": lat}  # fmt: skip

    rows = [row(5, True), row(10, False), row(10, True), row(20, False), row(20, False),
            row(40, True)]  # fmt: skip
    best = max_sustainable(rows, "edge")
    assert (best["patients"], best["first_failing_batches_per_s"]) == (10, 500.0)
