"""telehealth-bench (`make bench`): the fixed benchmark suite, its report and the README table.

The suite, in one run against one set of systems under test:
1. issue 2: 100 and 500 patients x 25 batches/s (40 ms ECG at 250 Hz, vitals 1/s), one
   subscriber each, on the edge, the bare echo and Mosquitto QoS 0 / QoS 1;
2. maximum sustainable batches/s with p99 under 50 ms, edge and echo, by a step ramp with
   bisection (scenario `ramp-to-saturation`);
3. placement: SessionsService.Open latency with 1,000 edges and 100,000 live sessions.
4. video (issue 3, EXTRA_SECTIONS): glass-to-glass latency through an edge process against a
   direct aiortc call, fps, the edge's CPU per call, calls per edge at >= 25 fps, build-up.
Failover scenarios (issue 7) are to be added to SUITE as they land.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import failover
from loadtest.figures import (
    compare_p99,
    equal_load,
    fmt_latency,
    fmt_ratio,
    fmt_sustainable,
    is_generator_bound,
    latency_figure,
    lower_bound,
    max_sustainable,
    memory,
    sustainable_ratio,
    throughput_ratio,
)
from loadtest.host import machine_info
from loadtest.longbench import LONG_CALL_S, main_long, update_long_readme
from loadtest.placement import run_placement
from loadtest.plots import all_plots
from loadtest.report import (
    Goal,
    base_report,
    copy_latest,
    fmt_ms,
    goals_table,
    machine_line,
    markdown_table,
    path_figures,
    rows_of,
    summary_table,
    update_readme,
    write_report,
)
from loadtest.runner import RunContext, run_scenario
from loadtest.scenario import PATHS, Scenario, load_scenario
from loadtest.video import bench_section as video_section
from loadtest.video import goals as video_goals
from loadtest.video import readme_lines as video_readme_lines

ISSUE2 = Scenario(
    name="issue2",
    description="patients x 25 batches/s (40 ms ECG at 250 Hz + vitals 1/s), 1 subscriber each",
    batch_rate_hz=25,
    ecg_hz=250,
    vitals_rate_hz=1,
    subscribers_per_patient=1,
    duration_s=15,
    ramp_s=2,
    # The edge last: an overloaded edge keeps working off its backlog (archive replication)
    # for a while, which would land on the peers sharing its CPU.
    paths=("echo", "mqtt-qos0", "mqtt-qos1", "edge"),
    connections=8,
)
LOADS = (100, 500)
P99_GOAL_MS = 20.0
RATIO_GOAL = 0.70
PLACEMENT_GOAL_MS = 1.0
# issue 7: make bench "runs the fixed suite in under 10 minutes".
BUDGET_S = 600.0
# Where the video and failover scenarios of issue 7 go. Scenario runs: (scenario file or
# name, patients override or 0); their rows join the table. Sections: name -> coroutine run
# after the vitals suite (systems under test still up), its dict kept as figures[name].
SUITE_EXTRA: list[tuple[str, int]] = []
BenchSection = Callable[[RunContext], Awaitable[dict[str, Any]]]
EXTRA_SECTIONS: dict[str, BenchSection] = {"video": video_section}


async def _failover_section(ctx: RunContext) -> dict[str, Any]:
    # The vitals systems are idle; stop them so the failover mesh has the machine.
    ctx.systems.stop()
    print("[failover] kill -9 an edge under 20 patients, zone change, drain ...", file=sys.stderr)
    return await failover.measure(ctx.work_dir)


EXTRA_SECTIONS["failover"] = _failover_section


def _row(rows: Sequence[dict[str, Any]], label: str, patients: int) -> dict[str, Any] | None:
    for r in rows:
        if r["label"] == label and r["patients"] == patients and not r.get("bisect"):
            return r
    return None


def under(row: dict[str, Any], key: str, limit: float) -> bool | None:
    """Is the row's latency figure under `limit`? None when it cannot say: a lower bound
    under the limit, or a generator-bound figure over it (the generator's delay is in it)."""
    v = row["latency_ms"][key]
    if v < limit:
        return None if lower_bound(row, key) else True
    return None if is_generator_bound(row) else False


def ratio_goal(r: dict[str, Any], goal: float) -> bool | None:
    """Whether a qualified ratio meets `goal`, or None when its qualifier leaves it open."""
    v, bound = r["value"], r["bound"]
    if bound == "exact":
        return bool(v >= goal)
    if bound == "lower_bound":
        return True if v >= goal else None
    if bound == "upper_bound":
        return False if v < goal else None
    return None


def _ratio_text(r: dict[str, Any]) -> str:
    return fmt_ratio(r) + (f" ({r['why']})" if r.get("why") else "")


def figures_and_goals(
    rows: Sequence[dict[str, Any]], ramp_rows: Sequence[dict[str, Any]], placement: dict[str, Any]
) -> tuple[dict[str, Any], list[Goal]]:
    figs: dict[str, Any] = {"issue2": {}}
    goals: list[Goal] = []
    eq = equal_load(rows)
    for n in LOADS:
        edge, echo = _row(rows, "edge", n), _row(rows, "echo", n)
        f: dict[str, Any] = {}
        for label in PATHS:
            r = _row(rows, label, n)
            if r is not None:
                f[label] = {
                    **latency_figure(r),
                    "delivered_batches_per_s": round(r["delivered_batches_per_s"], 1),
                    "offered_batches_per_s": round(r["offered_batches_per_s"], 1),
                    "sent": r["sent"],
                    "not_sent": r.get("not_sent", r["scheduled"] - r["sent"]),
                    "delivered": r["delivered"],
                    "lost": r["lost"],
                    "loss_ratio": r["loss_ratio"],
                    "late": r.get("late", 0),
                    "drops": r["drops"],
                    "cpu_percent": {k: v["cpu_percent"] for k, v in r["cpu"].items()},
                    "server": r.get("server", {}),
                }
        if edge and echo and echo["delivered_batches_per_s"] > 0:
            f["edge_to_echo_throughput_ratio"] = throughput_ratio(edge, echo)
        for q in ("mqtt-qos0", "mqtt-qos1"):
            cmp = eq.get(f"{n}_patients", {}).get(f"edge_vs_{q}")
            if cmp is not None:
                f[f"edge_vs_{q}"] = cmp
        figs["issue2"][f"{n}_patients"] = f
    e100, q1_100 = _row(rows, "edge", 100), _row(rows, "mqtt-qos1", 100)
    if e100 is not None:
        goals.append(
            Goal(
                "edge p99 at 100 patients",
                f"< {P99_GOAL_MS:g} ms",
                f"{fmt_latency(e100, 'p99')} ms"
                + (" (generator-bound)" * is_generator_bound(e100)),
                under(e100, "p99", P99_GOAL_MS),
            )
        )
        not_sent = e100.get("not_sent", e100["scheduled"] - e100["sent"])
        goals.append(
            Goal(
                "edge loss at 100 patients",
                "0",
                f"{e100['lost']} of {e100['expected']} undelivered, {not_sent} not sent",
                e100["lost"] == 0 and not_sent == 0,
            )
        )
        if q1_100 is not None:
            goals.append(
                Goal(
                    "edge p99 vs Mosquitto QoS 1 p99 (100 patients)",
                    "edge <= QoS 1",
                    f"{fmt_latency(e100, 'p99')} vs {fmt_latency(q1_100, 'p99')} ms",
                    compare_p99(e100, q1_100),
                )
            )
    for n in LOADS:
        r = figs["issue2"][f"{n}_patients"].get("edge_to_echo_throughput_ratio")
        goals.append(
            Goal(
                f"edge delivered/s as share of echo ({n} patients)",
                f">= {RATIO_GOAL:.0%}",
                "n/a" if r is None else _ratio_text(r),
                None if r is None else ratio_goal(r, RATIO_GOAL),
            )
        )
    sat = {label: max_sustainable(ramp_rows, label) for label in ("edge", "echo")}
    figs["max_sustainable_p99_under_50ms"] = sat
    if sat["echo"]["batches_per_s"]:
        r = sustainable_ratio(sat["edge"], sat["echo"])
        figs["max_sustainable_edge_to_echo_ratio"] = r
        goals.append(
            Goal(
                "edge max sustainable as share of echo's",
                f">= {RATIO_GOAL:.0%}",
                f"{fmt_sustainable(sat['edge'])} vs {fmt_sustainable(sat['echo'])} batches/s "
                f"({_ratio_text(r)})",
                ratio_goal(r, RATIO_GOAL),
            )
        )
    if placement:
        figs["placement"] = placement
        # DESIGN's "well under a millisecond" is the placement decision; an Open also makes a
        # gRPC round trip and commits the new session to the store.
        decision = placement.get("server", {}).get("decision", {})
        if decision.get("count"):
            bound_us = decision["p99_le_us"]
            goals.append(
                Goal(
                    "placement decision p99, 1,000 edges + 100,000 live sessions",
                    f"< {PLACEMENT_GOAL_MS:g} ms (DESIGN: well under a millisecond)",
                    f"<= {bound_us:g} µs (histogram bucket bound)",
                    bound_us < PLACEMENT_GOAL_MS * 1000,
                )
            )
        goals.append(
            Goal(
                "Open RPC p99 (gRPC + placement + store commit), same state",
                "report only",
                f"{fmt_ms(placement['latency_ms']['p99'])} ms",
                None,
            )
        )
    return figs, goals


def readme_body(report: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    figs = report["figures"]
    sat = figs.get("max_sustainable_p99_under_50ms", {})
    lines = [
        "## Benchmarks",
        "",
        f"`make bench`, {report['started_utc']} ({report['elapsed_s']:.0f} s). "
        f"{machine_line(report)}.",
        "",
        markdown_table(summary_table(rows)),
        "",
        "Maximum sustainable batches/s with p99 under 50 ms (every batch sent and delivered): "
        + ", ".join(_sustainable_text(k, v) for k, v in sat.items())
        + ".",
    ]
    if "max_sustainable_edge_to_echo_ratio" in figs:
        r = figs["max_sustainable_edge_to_echo_ratio"]
        lines[-1] += (
            f" Edge/echo: {fmt_ratio(r)}"
            + (
                " (≤: the echo figure is only a lower bound)"
                if isinstance(r, dict) and r["bound"] == "upper_bound"
                else ""
            )
            + "."
        )
    bound_rows = [r["name"] for r in report.get("runs", rows) if is_generator_bound(r)]
    if bound_rows:
        lines.append(
            "Generator-bound rows (the load generator, not the system, was the limit; not "
            f"ceilings): {', '.join(bound_rows)}."
        )
    if "placement" in figs:
        p = figs["placement"]
        lines.append(
            f"Placement with {p['edges']} edges and {p['live_sessions']} live sessions: "
            f"the decision p99 <= {p.get('server', {}).get('decision', {}).get('p99_le_us', 0):g} µs; "
            f"an Open (gRPC round trip, decision, store commit) p50 "
            f"{fmt_ms(p['latency_ms']['p50'])} ms, p99 {fmt_ms(p['latency_ms']['p99'])} ms."
        )
    if "error" in figs.get("failover", {}):
        lines.append(f"Failover: the measurement failed ({figs['failover']['error']}).")
    elif "failover" in figs:
        f = figs["failover"]
        lines.append(
            f"Failover (kill -9 of the edge under {f['patients']} patients): gap p50 "
            f"{f['edge_kill_gap']['p50_s'] * 1000:.0f} ms, max "
            f"{f['edge_kill_gap']['max_s'] * 1000:.0f} ms (goal < 1 s); zone change "
            f"(make-before-break) to first ack on the new edge p50 "
            f"{f['zone_change_handover']['p50_s'] * 1000:.0f} ms, max "
            f"{f['zone_change_handover']['max_s'] * 1000:.0f} ms; drain of "
            f"{f['patients'] // 2} sessions {f['drain_rpc_s'] * 1000:.0f} ms (make-before-break), "
            f"handover p50 {f['drain_handover']['p50_s'] * 1000:.0f} ms, max "
            f"{f['drain_handover']['max_s'] * 1000:.0f} ms, {f['drain_reconnects']} reconnects;"
            f" {f['batches_sent']} batches sent, {f['batches_archived']} archived "
            f"({f['lost']} lost)."
        )
    if "video" in figs:
        lines += ["", *video_readme_lines(figs["video"])]
    lines += [
        "",
        markdown_table(goals_table([Goal.from_dict(g) for g in report["goals"]])),
        "",
        "![latency CDF per path](results/latest-latency-cdf.png)",
        "",
        "Full report: [results/latest.html](results/latest.html) "
        "(JSON: [results/latest.json](results/latest.json)). Latency is subscriber receipt "
        "minus the batch's scheduled send time (open loop); `not sent` counts batches the "
        "generator could not send in time (server push-back or generator CPU), `undelivered` "
        "those sent but not received within the drain. Other work shared this machine during "
        "the run (see the load average above), and figures vary between runs with it; the "
        "JSON keeps the load average after every step.",
    ]
    return "\n".join(lines)


def _sustainable_text(label: str, v: dict[str, Any]) -> str:
    n = v["patients"]
    kind = v.get("kind", "unknown")
    what = {
        "ceiling": "ceiling",
        "lower_bound": f"at least: {v.get('why', '')}",
        "none": v.get("why", ""),
        # Reports from before the kinds were recorded cannot say which it was.
        "unknown": "ceiling or not: not recorded in this report",
    }.get(kind, kind)
    return f"{label} {fmt_sustainable({**v, 'kind': kind})} ({n} patient{'s' * (n != 1)}; {what})"


async def run_suite(
    ctx: RunContext, duration_s: float, ramp_step_s: float, placement_opens: int, progress: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Run everything; returns (rows' results, ramp results, sections by name, scenarios)."""
    results: list[dict[str, Any]] = []
    scenarios: list[dict[str, Any]] = []
    t0 = time.monotonic()
    phases = len(LOADS) + 2 + len(SUITE_EXTRA) + len(EXTRA_SECTIONS)
    done = 0

    def phase(what: str) -> None:
        nonlocal done
        done += 1
        print(
            f"[bench] phase {done}/{phases}: {what} ({time.monotonic() - t0:.0f} s so far)",
            file=sys.stderr,
            flush=True,
        )

    for n in LOADS:
        sc = replace(ISSUE2, name=f"issue2-{n}", patients=n, duration_s=duration_s)
        phase(f"{n} patients on {', '.join(sc.paths)}")
        scenarios.append(sc.to_dict())
        # Fresh systems per phase, so one phase's leftovers never load the next.
        ctx.systems.stop()
        results += await run_scenario(ctx, sc, progress)
    ramp = replace(load_scenario("ramp-to-saturation"), duration_s=ramp_step_s)
    phase(f"saturation ramp on {', '.join(ramp.paths)}")
    scenarios.append(ramp.to_dict())
    ctx.systems.stop()
    ramp_results = await run_scenario(ctx, ramp, progress)
    for name, patients in SUITE_EXTRA:
        sc = load_scenario(name)
        if patients:
            sc = replace(sc, patients=patients)
        phase(f"scenario {sc.name}")
        scenarios.append(sc.to_dict())
        results += await run_scenario(ctx, sc, progress)
    extra: dict[str, Any] = {}
    for section, run_section in EXTRA_SECTIONS.items():
        phase(section)
        try:
            extra[section] = await run_section(ctx)
        except Exception as e:  # one failing section must not sink the suite
            print(f"[{section}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            extra[section] = {"error": f"{type(e).__name__}: {e}"}
    # The mesh, echo and broker are idle now; stop them so placement has the SUT CPU alone.
    ctx.systems.stop()
    phase("placement")
    print("[placement] building 1,000 edges and 100,000 sessions ...", file=sys.stderr)
    placement = await asyncio.to_thread(
        run_placement, ctx.work_dir, ctx.pinning, 1000, 100_000, placement_opens
    )
    print(
        f"[placement] Open p50 {placement['latency_ms']['p50']:.2f} ms, "
        f"p99 {placement['latency_ms']['p99']:.2f} ms",
        file=sys.stderr,
    )
    return results, ramp_results, {**extra, "placement": placement}, scenarios


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="telehealth-bench",
        description="Run the fixed benchmark suite (edge vs bare gRPC echo vs Mosquitto QoS 0/1 "
        "at 100 and 500 patients, saturation ramp, failover, video, placement) in under 10 "
        "minutes; write results/bench-<UTC>.json/.html/-*.png, results/latest.*, and the "
        "README table. With --long: the 30-minute soak and a 10-minute video call instead.",
        epilog="examples:\n  telehealth-bench                      # make bench\n"
        "  telehealth-bench --long               # make bench-long\n"
        "  telehealth-bench --long --soak-duration 30 --call-s 0 --out /tmp/x --no-readme\n"
        "  telehealth-bench --readme-from results/latest.json   # README block from a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per issue-2 run")
    parser.add_argument("--ramp-step", type=float, default=6.0, help="seconds per ramp step")
    parser.add_argument("--opens", type=int, default=500, help="Opens timed for placement")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument(
        "--readme-from",
        type=Path,
        metavar="REPORT_JSON",
        help="only rewrite the README section from an existing bench report, then exit",
    )
    long = parser.add_argument_group(
        "long runs (make bench-long, about 45 minutes; not part of make bench)"
    )
    long.add_argument(
        "--long",
        action="store_true",
        help="run the 30-minute soak and a 10-minute video call instead of the suite; write "
        "results/long-<UTC>.*, results/latest-long.* and the README's long-bench block",
    )
    long.add_argument(
        "--soak-duration",
        type=float,
        default=0.0,
        metavar="S",
        help="with --long: soak seconds instead of the scenario's 1800 (a short check)",
    )
    long.add_argument(
        "--call-s",
        type=float,
        default=LONG_CALL_S,
        metavar="S",
        help="with --long: seconds of the video call (default 600; 0 skips it)",
    )
    ns = parser.parse_args(argv)
    if ns.readme_from:
        report = json.loads(ns.readme_from.read_text())
        if report.get("kind") == "bench-long":
            update_long_readme(ns.readme, report)
            return
        main_rows = [r for r in report["runs"] if not r["name"].startswith("ramp:")]
        update_readme(ns.readme, readme_body(report, main_rows))
        return
    if ns.long:
        progress = "tty" if sys.stderr.isatty() else "lines"
        main_long(
            ns.out, None if ns.no_readme else ns.readme, ns.soak_duration, ns.call_s, progress
        )
        return
    started = time.time()
    machine = machine_info()
    progress = "tty" if sys.stderr.isatty() else "lines"
    ctx = RunContext.create()
    try:
        results, ramp_results, sections, scenarios = asyncio.run(
            run_suite(ctx, ns.duration, ns.ramp_step, ns.opens, progress)
        )
        systems = ctx.systems.describe()
    finally:
        ctx.close()
    rows = rows_of(results)
    ramp_rows = rows_of(ramp_results)
    for r in ramp_rows:
        r["name"] = f"ramp:{r['name']}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out: Path = ns.out
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"bench-{stamp}"
    report = base_report(
        title="telehealth-mesh benchmarks",
        kind="bench",
        machine=machine,
        pinning=ctx.pinning.to_dict(),
        systems=systems,
        scenarios=scenarios,
        rows=[*rows, *ramp_rows],
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        elapsed_s=time.time() - started,
        notes=[
            f"make bench's budget is {BUDGET_S:.0f} s; elapsed_s says what this run took.",
            "Placement is timed with one Open in flight at a time (service latency), after "
            "one warm-up call; the 1,000 edges are registry entries kept alive by in-process "
            "heartbeats, the 100,000 sessions rows loaded by the directory at start.",
            "Saturation: a step passes with p99 under 50 ms (every expected delivery counted, "
            "unsent and undelivered ones at their lower bounds), every batch sent and every one "
            "delivered; two failing steps end the ramp, then two bisection "
            "steps between the best pass and the first failure. A failing step is run once "
            "more before it counts (the machine is shared); both attempts are in `runs`.",
            "Systems under test are restarted between the 100-patient, 500-patient and ramp "
            "phases; within a phase the edge runs last.",
        ],
    )
    placement = sections.pop("placement")
    figs, goals = figures_and_goals(rows, ramp_rows, placement)
    figs["memory_growth"] = memory(results)
    if "video" in sections:
        goals += video_goals(sections["video"])
    report["figures"] = {**figs, **sections, "per_run": path_figures([*rows, *ramp_rows])}
    report["goals"] = [g.to_dict() for g in goals]
    rows_500 = [r for r in rows if r["patients"] == 500]
    plots = all_plots(
        prefix,
        cdf_rows=rows,
        load_rows=[*ramp_rows, *rows],
        time_rows=rows_500 or rows,
        drop_rows=[*rows, *ramp_rows],
        cdf_title="Latency per path at 100 and 500 patients (25 batches/s each)",
    )
    write_report(report, prefix, plots)
    copy_latest({".json": Path(f"{prefix}.json"), ".html": Path(f"{prefix}.html"), **{
        k: p for k, p in plots.items()}}, out)  # fmt: skip
    if not ns.no_readme:
        update_readme(ns.readme, readme_body(report, rows))
    print(markdown_table(summary_table(rows)))
    print()
    print(markdown_table(goals_table(goals)))
    took = time.time() - started
    print(f"\nreport: {prefix}.json, {prefix}.html; took {took:.0f} s")
    if took > BUDGET_S:
        print(
            f"telehealth-bench: took {took:.0f} s, over the {BUDGET_S:.0f} s budget of make bench",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
