"""telehealth-loadtest: run a load scenario against the mesh and its peers, then write a report."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.figures import run_figures
from loadtest.host import machine_info
from loadtest.placement import run_placement
from loadtest.plots import all_plots
from loadtest.report import (
    base_report,
    copy_latest,
    markdown_table,
    path_figures,
    rows_of,
    summary_table,
    write_report,
)
from loadtest.runner import RunContext, run_scenario
from loadtest.scenario import Scenario, ScenarioError, available, load_scenario

EPILOG = """\
examples:
  telehealth-loadtest list
  telehealth-loadtest run ci-smoke                 # 20 s, all paths, a few patients
  telehealth-loadtest run steady --out results/
  telehealth-loadtest run my-scenario.yaml --target 10.0.0.5:50051   # a mesh elsewhere

what it does:
  Starts what it measures on this machine (a one-zone mesh: core + edge; a bare gRPC echo
  relay; a private Mosquitto) pinned to one CPU, and runs the load generator as a separate
  process on another CPU. Simulated patients send batches on a fixed schedule (open loop);
  simulated clinicians subscribe. Latency is receipt minus scheduled send time.
  A progress line per path goes to stderr; the report goes to OUT as
  <scenario>-<UTC time>.json/.html/-*.png, plus latest-<scenario>.json/.html.

exit codes: 0 done, 2 bad scenario or arguments, 1 the run failed.
"""


def _write(
    sc: Scenario, results: list[dict[str, Any]], ctx: RunContext, out: Path,
    started: float, machine: dict[str, Any], placement: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:  # fmt: skip
    rows = rows_of(results)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"{sc.name}-{stamp}"
    report = base_report(
        title=f"telehealth-mesh load test: {sc.name}",
        kind="loadtest-run",
        machine=machine,
        pinning=ctx.pinning.to_dict(),
        systems=ctx.systems.describe(),
        scenarios=[sc.to_dict()],
        rows=rows,
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        elapsed_s=time.time() - started,
    )
    report["figures"] = {**run_figures(results, rows), "per_run": path_figures(rows)}
    if placement:
        report["figures"]["placement"] = placement
    main_rows = [r for r in rows if not r.get("bisect")]
    plots = all_plots(prefix, main_rows, rows, main_rows, rows, limit_ms=sc.p99_limit_ms)
    write_report(report, prefix, plots)
    copy_latest(
        {f"-{sc.name}.json": Path(f"{prefix}.json"), f"-{sc.name}.html": Path(f"{prefix}.html")},
        out,
    )
    return report, Path(f"{prefix}.json")


async def run_small_placement(ctx: RunContext, sc: Scenario) -> dict[str, Any]:
    """The scenario's placement run: Opens timed against a real core holding its edges and
    sessions (loadtest.placement, the bench's method at the scenario's scale)."""
    print(
        f"[placement] {sc.placement_edges} edges, {sc.placement_sessions} live sessions, "
        f"{sc.placement_opens} Opens ...",
        file=sys.stderr,
        flush=True,
    )
    result = await asyncio.to_thread(
        run_placement,
        ctx.work_dir,
        ctx.pinning,
        sc.placement_edges,
        sc.placement_sessions,
        sc.placement_opens,
    )
    lat = result["latency_ms"]
    print(f"[placement] Open p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms", file=sys.stderr)
    return result


async def _run(sc: Scenario, target: str, mqtt: str, out: Path, progress: str) -> int:
    started = time.time()
    machine = machine_info()  # first, so the load average is the one before we add load
    ctx = RunContext.create(core_address="" if target == "local" else target, mqtt_address=mqtt)
    placement: dict[str, Any] | None = None
    try:
        results = await run_scenario(ctx, sc, progress)
        if sc.placement_edges:
            # The load's systems are idle now; stop them so placement has the SUT CPU alone.
            ctx.systems.stop()
            placement = await run_small_placement(ctx, sc)
    finally:
        ctx.close()
    report, path = _write(sc, results, ctx, out, started, machine, placement)
    print(markdown_table(summary_table(report["runs"])))
    print(f"\nreport: {path} and {path.with_suffix('.html')}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="telehealth-loadtest",
        description="Drive simulated patients and clinicians through the telehealth mesh and "
        "its peer baselines (bare gRPC echo, Mosquitto QoS 0/1); report latency, throughput, "
        "loss and CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in scenarios")
    run = sub.add_parser(
        "run",
        help="run a scenario and write its report",
        description="Run SCENARIO (a built-in name or a YAML file) and write the report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("scenario", metavar="SCENARIO", help="built-in name (see `list`) or a .yaml")
    run.add_argument(
        "--target",
        default="local",
        help="'local' starts a one-zone mesh here; or HOST:PORT of a core to drive "
        "(its processes are then not pinned or measured)",
    )
    run.add_argument("--out", type=Path, default=Path("results"), help="report directory")
    run.add_argument(
        "--mqtt", default="", help="HOST:PORT of a broker to use instead of a private Mosquitto"
    )
    run.add_argument(
        "--duration", type=float, default=0.0, help="override the scenario's duration_s"
    )
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    ns = parser.parse_args(argv)
    if ns.command == "list":
        for name in available():
            sc = load_scenario(name)
            print(f"{name:<20} {sc.description}")
        return
    try:
        sc = load_scenario(ns.scenario)
        if ns.duration:
            if ns.duration < 1:
                raise ScenarioError("--duration must be at least 1 second")
            from dataclasses import replace

            sc = replace(sc, duration_s=ns.duration)
    except ScenarioError as e:
        print(f"telehealth-loadtest: {e}", file=sys.stderr)
        sys.exit(2)
    progress = "off" if ns.quiet else ("tty" if sys.stderr.isatty() else "lines")
    try:
        code = asyncio.run(_run(sc, ns.target, ns.mqtt, ns.out, progress))
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"telehealth-loadtest: run failed: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
