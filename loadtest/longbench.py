"""telehealth-bench --long (`make bench-long`): the runs too long for `make bench`.

1. The built-in `soak` scenario (100 patients x 25 batches/s on the edge for 30 minutes): its
   latency and loss, and the memory growth of every process computed from RSS sampled each
   second — mean of the first and the last 5 minutes after the ramp, and the least-squares
   slope — with the goal "flat" (issue 7);
2. one 640x480@30 two-way video call through the edge for 10 minutes, the latency of its
   first minute against its tenth (issue 3), measured by loadtest.video.

Writes results/long-<UTC>.json/.html/-*.png and results/latest-long.*, and rewrites the
README block between <!-- bench-long:start --> and <!-- bench-long:end --> from that report
(`telehealth-bench --long --readme-from results/latest-long.json` redoes it from the JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import video
from loadtest.figures import (
    FLAT_MIB,
    FLAT_PERCENT,
    fmt_latency,
    is_generator_bound,
    latency_figure,
    memory,
    memory_flat,
)
from loadtest.plots import all_plots, memory_timeline
from loadtest.report import (
    Goal,
    base_report,
    copy_latest,
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
from loadtest.scenario import Scenario, load_scenario

README_LONG_START = "<!-- bench-long:start -->"
README_LONG_END = "<!-- bench-long:end -->"
LONG_CALL_S = video.LONG_CALL_S
# The call's first and last windows compared (the first minute against the tenth).
CALL_WINDOW_S = video.LONG_WINDOW_S
SOAK_P99_LIMIT_MS = 50.0


def soak_scenario(duration_s: float = 0.0) -> Scenario:
    """The built-in soak, optionally shorter (a short one is for checking the machinery)."""
    sc = load_scenario("soak")
    if duration_s:
        sc = replace(sc, duration_s=duration_s, ramp_s=min(sc.ramp_s, duration_s / 5))
    return sc


async def _ticker(what: str, total_s: float, every_s: float = 30.0) -> None:
    """Progress for a phase that prints nothing of its own for minutes."""
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        print(
            f"[{what}] {time.monotonic() - t0:.0f} s of about {total_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )


async def long_call(ctx: RunContext, call_s: float) -> dict[str, Any]:
    """One call through the edge for call_s (engineer E's loadtest.video.measure_long_call: the
    direct baselines around it, no capacity ramp); its first and last CALL_WINDOW_S are the
    early/late figures."""
    ctx.systems.stop()
    window = min(CALL_WINDOW_S, call_s / 5)
    print(
        f"[video] one 640x480@30 call through the edge for {call_s:.0f} s "
        f"(first vs last {window:.0f} s) ...",
        file=sys.stderr,
        flush=True,
    )
    ticker = asyncio.create_task(_ticker("video long call", call_s + 60))
    try:
        return await video.measure_long_call(
            call_s, window, pinning=ctx.pinning, work_dir=ctx.work_dir
        )
    except Exception as e:  # a failure here must not lose the soak's results
        print(f"[video] failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def run_long(
    ctx: RunContext, soak: Scenario, call_s: float, progress: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    print(
        f"[bench-long] 1/2: soak, {soak.patients} patients x {soak.batch_rate_hz:g} batches/s "
        f"on {', '.join(soak.paths)} for {soak.duration_s:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    ctx.systems.stop()
    results = await run_scenario(ctx, soak, progress)
    ctx.systems.stop()
    print(f"[bench-long] 2/2: video call of {call_s:.0f} s", file=sys.stderr, flush=True)
    call = await long_call(ctx, call_s) if call_s else {}
    return results, call


def soak_figures(
    sc: Scenario, results: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The soak's headline figures; memory from RSS sampled over the whole generator run."""
    row = rows[0]
    mem = memory(results)
    by_proc = mem.get(row["label"], {})
    return {
        "scenario": sc.name,
        "patients": row["patients"],
        "duration_s": row["duration_s"],
        "offered_batches_per_s": round(row["offered_batches_per_s"], 1),
        "delivered_batches_per_s": round(row["delivered_batches_per_s"], 1),
        **latency_figure(row),
        "not_sent": row["not_sent"],
        "lost": row["lost"],
        "late": row["late"],
        "drops": row["drops"],
        "server": row.get("server", {}),
        "memory_growth": by_proc,
        # Flat: last-window mean within max(FLAT_MIB, FLAT_PERCENT%) of the first window's.
        "memory_flat": memory_flat(mem),
        "memory_flat_rule": f"last vs first window mean RSS within max({FLAT_MIB:g} MiB, "
        f"{FLAT_PERCENT:g}%) for every system-under-test process",
        "generator_memory": by_proc.get("generator", {}),
    }


def long_goals(soak: dict[str, Any], call: dict[str, Any]) -> list[Goal]:
    goals = []
    sut = {k: g for k, g in soak["memory_growth"].items() if k != "generator"}
    goals.append(
        Goal(
            "soak: memory of every system-under-test process flat",
            f"growth <= max({FLAT_MIB:g} MiB, {FLAT_PERCENT:g}%)",
            ", ".join(
                f"{k} {g['first_mib']:.0f} -> {g['last_mib']:.0f} MiB "
                f"({g['growth_mib']:+.1f}; {g['slope_mib_per_h']:+.1f} MiB/h)"
                for k, g in sorted(sut.items())
            )
            or "n/a",
            soak["memory_flat"],
        )
    )
    gen = soak["generator_memory"]
    if gen:
        goals.append(
            Goal(
                "soak: load generator's own memory bounded",
                f"growth <= max({FLAT_MIB:g} MiB, {FLAT_PERCENT:g}%)",
                f"{gen['first_mib']:.0f} -> {gen['last_mib']:.0f} MiB ({gen['growth_mib']:+.1f})",
                bool(gen["flat"]),
            )
        )
    goals.append(
        Goal(
            "soak: every batch sent and delivered",
            "0 not sent, 0 undelivered",
            f"{soak['not_sent']} not sent, {soak['lost']} undelivered",
            soak["not_sent"] == 0 and soak["lost"] == 0,
        )
    )
    p99, lb = soak["latency_ms"]["p99"], soak["lower_bound"]["p99"]
    goals.append(
        Goal(
            "soak: p99 over the whole run",
            f"< {SOAK_P99_LIMIT_MS:g} ms",
            ("≥" if lb else "") + f"{p99:.2f} ms"
            + (" (generator-bound)" if soak["generator_bound"] else ""),
            (None if lb else True) if p99 < SOAK_P99_LIMIT_MS
            else (None if soak["generator_bound"] else False),
        )
    )  # fmt: skip
    if call:
        if "error" in call:
            goals.append(
                Goal("video: long call", "measured", f"failed: {call['error'][:80]}", False)
            )
        else:
            ev = call["early_vs_late"]
            build = ev.get("build_up_ms")
            goals.append(
                Goal(
                    f"video: latency in the last {_dur(ev['window_s'])} of a "
                    f"{_dur(ev['call_s'])} call vs the first",
                    f"build-up <= {video.GOAL_ADDED_MS:.0f} ms",
                    "n/a"
                    if build is None
                    else f"{build:+.1f} ms ({ev['first_p50_ms']} -> {ev['last_p50_ms']} ms p50)",
                    None if build is None else build <= video.GOAL_ADDED_MS,
                )
            )
    return goals


def _dur(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 120 else f"{seconds:.0f} s"


def readme_long_body(report: dict[str, Any]) -> str:
    figs = report["figures"]
    s = figs["soak"]
    rows = report["runs"]
    call_fig = figs.get("video_long_call") or {}
    call_s = call_fig.get("early_vs_late", {}).get("call_s")
    lines = [
        f"### Long runs: a {_dur(s['duration_s'])} soak"
        + (f" and a {_dur(call_s)} video call" if call_s else ""),
        "",
        f"`make bench-long`, {report['started_utc']} ({_dur(report['elapsed_s'])}). "
        f"{machine_line(report)}.",
        "",
        f"Soak (`{s['scenario']}` scenario): {s['patients']} patients, "
        f"{s['offered_batches_per_s']:.0f} batches/s offered for {_dur(s['duration_s'])} "
        f"on the edge; p50 {fmt_latency(rows[0], 'p50')} ms, "
        f"p99 {fmt_latency(rows[0], 'p99')} ms, max {fmt_latency(rows[0], 'max')} ms; "
        f"{s['not_sent']} not sent, {s['lost']} undelivered, {s['late']} later than 50 ms"
        + ("; generator-bound" if is_generator_bound(rows[0]) else "")
        + ".",
        "",
        "| process | RSS first window MiB | RSS last window MiB | growth MiB | slope MiB/h | flat |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in sorted(s["memory_growth"].items()):
        lines.append(
            f"| {name} | {g['first_mib']:.1f} | {g['last_mib']:.1f} | {g['growth_mib']:+.1f} "
            f"| {g['slope_mib_per_h']:+.1f} | {'yes' if g['flat'] else 'NO'} |"
        )
    windows = [float(g["window_s"]) for g in s["memory_growth"].values()]
    window = windows[0] if windows else 0.0
    lines += [
        "",
        f"Windows of {_dur(window)} after the ramp; slope by least squares over "
        f"the run; flat = {s['memory_flat_rule']}.",
    ]
    call = figs.get("video_long_call") or {}
    if call and "error" not in call:
        lines += ["", *video.readme_lines(call)]
    elif call:
        lines += ["", f"Video long call: the measurement failed ({call['error']})."]
    lines += [
        "",
        markdown_table(goals_table([Goal.from_dict(g) for g in report["goals"]])),
        "",
        "![memory per process over the soak](results/latest-long-memory.png)",
        "",
        "Full report: [results/latest-long.html](results/latest-long.html) "
        "(JSON: [results/latest-long.json](results/latest-long.json)).",
    ]
    return "\n".join(lines)


def write_long_report(
    out: Path,
    started: float,
    machine: dict[str, Any],
    pinning: dict[str, Any],
    systems: dict[str, Any],
    sc: Scenario,
    results: list[dict[str, Any]],
    call: dict[str, Any],
) -> tuple[dict[str, Any], Path]:
    rows = rows_of(results)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"long-{stamp}"
    report = base_report(
        title="telehealth-mesh long benchmarks: the soak and a long video call",
        kind="bench-long",
        machine=machine,
        pinning=pinning,
        systems=systems,
        scenarios=[sc.to_dict()],
        rows=rows,
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        elapsed_s=time.time() - started,
        notes=[
            "Memory growth is computed from RSS sampled every second over the whole generator "
            "run: the mean of the first and of the last window (a fifth of the run after the "
            "ramp, at most 5 minutes), their difference, and the least-squares slope.",
            "The video call's figures come from loadtest.video (a direct aiortc call before and "
            "after, pooled, against the call through the edge); its early/late windows are the "
            "first and last minute of the call.",
        ],
    )
    soak = soak_figures(sc, results, rows)
    report["figures"] = {"soak": soak, "per_run": path_figures(rows)}
    if call:
        report["figures"]["video_long_call"] = call
    goals = long_goals(soak, call)
    report["goals"] = [g.to_dict() for g in goals]
    plots = all_plots(
        prefix,
        rows,
        rows,
        rows,
        rows,
        cdf_title=f"Latency over the {sc.duration_s / 60:.0f}-minute soak",
    )
    plots["-memory.png"] = memory_timeline(
        results, Path(f"{prefix}-memory.png"), "RSS per process over the soak"
    )
    write_report(report, prefix, plots)
    copy_latest(
        {"-long.json": Path(f"{prefix}.json"), "-long.html": Path(f"{prefix}.html"),
         **{f"-long{k}": p for k, p in plots.items()}},
        out,
    )  # fmt: skip
    return report, Path(f"{prefix}.json")


def update_long_readme(readme: Path, report: dict[str, Any]) -> None:
    update_readme(readme, readme_long_body(report), README_LONG_START, README_LONG_END)


def main_long(out: Path, readme: Path | None, soak_s: float, call_s: float, progress: str) -> None:
    from loadtest.host import machine_info

    started = time.time()
    machine = machine_info()
    sc = soak_scenario(soak_s)
    ctx = RunContext.create()
    try:
        results, call = asyncio.run(run_long(ctx, sc, call_s, progress))
        systems = ctx.systems.describe()
    finally:
        ctx.close()
    report, path = write_long_report(
        out, started, machine, ctx.pinning.to_dict(), systems, sc, results, call
    )
    if readme is not None:
        update_long_readme(readme, report)
    print(markdown_table(summary_table(report["runs"])))
    print()
    print(markdown_table(goals_table([Goal.from_dict(g) for g in report["goals"]])))
    print(f"\nreport: {path}, {path.with_suffix('.html')}; took {time.time() - started:.0f} s")
