"""Reports: generator results into rows, figures and goals; JSON, HTML and the README table."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.figures import fmt_latency, fmt_ms, is_generator_bound

__all__ = ["fmt_ms"]

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
SCHEMA_VERSION = 1
# Per-row figures every report carries; tests check they are present and finite.
ROW_FIGURES = (
    "patients",
    "target_batches_per_s",
    "offered_batches_per_s",
    "delivered_batches_per_s",
    "sent",
    "not_sent",
    "expected",
    "delivered",
    "lost",
    "loss_ratio",
    "late",
    "drops",
)
LATENCY_FIGURES = ("p50", "p90", "p99", "p999", "max", "mean")


def rows_of(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured step of every generator, labelled by path and load."""
    rows = []
    for r in results:
        for s in r["steps"]:
            row = {
                "scenario": r.get("scenario", ""),
                "label": r["label"],
                "path": r["path"],
                "payload_bytes": r["payload_bytes"],
                "setup_s": r["setup_s"],
                "stream_errors": r.get("stream_errors", {}),
                "viewer_tokens": r.get("viewer_tokens", ""),
                **s,
            }
            row["name"] = f"{r['label']}@{s['patients']}"
            row["sut_cpu_percent"] = round(
                sum(v["cpu_percent"] for k, v in s["cpu"].items() if k != "generator"), 1
            )
            row["generator_cpu_percent"] = s["cpu"].get("generator", {}).get("cpu_percent", 0.0)
            rows.append(row)
    return rows


def finite_numbers(obj: Any, where: str = "") -> list[str]:
    """Paths of numbers in `obj` that are NaN or infinite (JSON cannot hold them honestly)."""
    bad: list[str] = []
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += finite_numbers(v, f"{where}[{i}]")
    return bad


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    measured: str
    met: bool | None  # None: could not be judged (figure missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal": self.name,
            "target": self.target,
            "measured": self.measured,
            "met": self.met,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Goal:
        """The goal again from its to_dict() form (a report's "goals")."""
        return cls(name=d["goal"], target=d["target"], measured=d["measured"], met=d["met"])


# Other processes on a pinned CPU worth a note (the machine is shared).
OTHERS_NOTE_PERCENT = 15.0


def row_notes(r: dict[str, Any]) -> str:
    """What qualifies a row: generator-bound, or the edge falling behind (its own counters)."""
    notes = []
    if is_generator_bound(r):
        notes.append("generator-bound")
    unread = r.get("server", {}).get("unread_at_send_end", 0)
    if unread:
        notes.append(f"edge had not read {unread:.0f} when sending stopped")
    shared = r.get("cpu_contention", {})
    for which, what in (("sut_cpus", "SUT"), ("generator_cpus", "generator")):
        others = shared.get(which, {}).get("others_percent", 0.0)
        if others >= OTHERS_NOTE_PERCENT:
            notes.append(f"other processes used {others:.0f}% of the {what} CPU")
    hc = r.get("server", {}).get("health_check_rtt_ms", {})
    if hc.get("p99", 0.0) > r.get("late_ms", 50.0):
        notes.append(f"edge answered health checks in p99 {fmt_ms(hc['p99'])} ms")
    if r.get("video"):
        from loadtest.generator import video_text

        notes.append(f"with video: {video_text(r['video'])}")
    return "; ".join(notes)


def summary_table(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Header and one line per row: the figures a reader compares across paths.

    "≥" marks a latency that is only a lower bound (it counts batches never sent or never
    delivered at the time they were given up on)."""
    out = [
        [
            "run",
            "patients",
            "offered/s",
            "delivered/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "not sent",
            "undelivered",
            "late",
            "drops",
            "SUT CPU %",
            "gen CPU %",
            "notes",
        ]
    ]
    for r in rows:
        late_ms = r.get("late_ms", 50.0)
        out.append(
            [
                r["name"],
                str(r["patients"]),
                f"{r['offered_batches_per_s']:.0f}",
                f"{r['delivered_batches_per_s']:.0f}",
                fmt_latency(r, "p50"),
                fmt_latency(r, "p99"),
                fmt_latency(r, "p999"),
                fmt_latency(r, "max"),
                str(r.get("not_sent", r["scheduled"] - r["sent"])),
                f"{r['lost']} ({100 * r['loss_ratio']:.2f}%)",
                f"{r.get('late', 0)} (>{late_ms:g} ms)" if r.get("late") else "0",
                str(r["drops"]),
                f"{r['sut_cpu_percent']:.0f}",
                f"{r['generator_cpu_percent']:.0f}",
                row_notes(r),
            ]
        )
    return out


def markdown_table(table: Sequence[Sequence[str]]) -> str:
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def html_table(table: Sequence[Sequence[str]]) -> str:
    head, *body = table
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def goals_table(goals: Sequence[Goal]) -> list[list[str]]:
    mark = {True: "met", False: "NOT met", None: "n/a"}
    return [["goal", "target", "measured", "result"]] + [
        [g.name, g.target, g.measured, mark[g.met]] for g in goals
    ]


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}pre{background:#f7f7f7;padding:1em;
overflow:auto;font-size:12px}.bad{color:#b00}
"""


def write_html(report: dict[str, Any], path: Path, plot_files: dict[str, Path]) -> None:
    """A self-contained page: tables, goals, plots embedded as data URIs, machine and notes."""
    rows = report["runs"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(report['title'])}</h1>",
        f"<p>{html.escape(report['started_utc'])} — {html.escape(machine_line(report))}</p>",
    ]
    if report.get("goals"):
        parts += [
            "<h2>Goals</h2>",
            html_table(goals_table([Goal.from_dict(g) for g in report["goals"]])),
        ]
    if report.get("figures"):
        parts += [
            "<h2>Figures</h2>",
            "<pre>",
            html.escape(json.dumps(report["figures"], indent=2)),
            "</pre>",
        ]
    parts += ["<h2>Measurements</h2>", html_table(summary_table(rows))]
    for name, f in plot_files.items():
        data = base64.b64encode(f.read_bytes()).decode()
        parts.append(
            f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
        )
    parts += [
        "<h2>Notes</h2><ul>",
        *(f"<li>{html.escape(n)}</li>" for n in report.get("notes", [])),
        "</ul>",
        "<h2>Machine, pinning and systems under test</h2><pre>",
        html.escape(
            json.dumps(
                {k: report[k] for k in ("machine", "pinning", "systems") if k in report}, indent=2
            )
        ),
        "</pre></body></html>",
    ]  # fmt: skip
    path.write_text("\n".join(parts))


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    p = report.get("pinning", {})
    pin = (
        f"SUT on CPU {p.get('sut_cpus')}, generator on CPU {p.get('generator_cpus')}"
        if p.get("separated")
        else "SUT and generator share CPUs"
    )
    code = m.get("code", {})
    commit = (
        f"; code at {code['commit'][:12]}{' with local changes' if code.get('dirty') else ''}"
        if code.get("commit")
        else ""
    )
    return (
        f"{m['cpus']} CPU ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.0f} GiB, "
        f"{m['kernel']}, Python {m['python']}, grpcio {m['packages'].get('grpcio')}, "
        f"mosquitto {m['mosquitto']}; 1-min load average {m['loadavg_start'][0]} at start, "
        f"{m.get('loadavg_end', ['?'])[0]} at end; {pin}{commit}"
    )


def write_json(report: dict[str, Any], path: Path) -> None:
    bad = finite_numbers(report)
    if bad:
        raise ValueError(f"report holds non-finite numbers at {', '.join(bad[:5])}")
    path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")


def write_report(report: dict[str, Any], prefix: Path, plots: dict[str, Path]) -> None:
    """Name the plots (all_plots' suffixes, e.g. "-latency-cdf.png") in the report, then write
    <prefix>.json and the self-contained <prefix>.html that embeds them."""
    named = {k.strip("-").removesuffix(".png"): p for k, p in plots.items()}
    report["plots"] = {name: p.name for name, p in named.items()}
    write_json(report, Path(f"{prefix}.json"))
    write_html(report, Path(f"{prefix}.html"), named)


def copy_latest(files: dict[str, Path], out_dir: Path) -> None:
    for key, f in files.items():
        shutil.copyfile(f, out_dir / f"latest{key}")


def update_readme(
    readme: Path, body: str, start: str = README_START, end: str = README_END
) -> None:
    """Replace what lies between the markers (the bench's by default); nothing outside them is
    touched. A README without them gets them appended; a missing one is created with them."""
    block = f"{start}\n{body.strip()}\n{end}"
    if not readme.exists():
        readme.write_text(block + "\n")
        return
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


STANDARD_NOTES = (
    "Open loop: every batch has a scheduled send time; senders never wait for acks. Latency is "
    "subscriber receipt time minus the scheduled send time (perf_counter_ns, one process), so "
    "time a batch spent waiting to be sent counts (no coordinated omission).",
    "Every expected delivery has a latency sample. A batch the generator could not send before "
    "sending stopped (the run's end plus max(drain, 1 s)) is recorded at stop - scheduled for "
    "each viewer it would have reached; a batch sent but not received when the drain ended is "
    "recorded at drain end - scheduled (or when it was 60 s overdue). Those samples are lower "
    "bounds, and a percentile that reaches them is printed with '≥' (latency_lower_bound in "
    "the JSON). A step with any batch not sent or not delivered does not pass 'sustainable'.",
    "Generator-bound: the load generator used >= 85% of its CPU, or its event loop ran a 10 ms "
    "timer more than 5 ms late at p99 (generator_loop_lag_ms) and that lag is over a tenth of "
    "the row's p99 (so it explains part of the figure). Such a row measures the "
    "generator as much as the system: its latency overstates the system's, its throughput "
    "understates it, and it is never taken as a ceiling; ratios against it are bounds.",
    "gRPC deliveries are timestamped on the generator's event loop, which the senders share; "
    "MQTT deliveries in paho's network threads. A gRPC timestamp can be late by at most the "
    "time a ready callback waits for the loop, which generator_loop_lag_ms measures per row "
    "(checked with the subscribers in a process of their own: no difference beyond "
    "run-to-run noise at 100 patients).",
    "generator_send_lag_ms per row is how late the generator wrote each batch (asyncio timer "
    "wake-ups, its loop, and a write blocked by the server's flow control on the same stream); "
    "it is included in every path's latency alike.",
    "Each path runs on its own (unless the scenario says parallel_paths) with identical "
    "VitalsBatch bytes: gRPC paths send them as PublishVitalsRequest field 1, MQTT publishes "
    "them bare. Patients share `connections` client connections; every patient has its own "
    "stream (gRPC) or topic (MQTT).",
    "not sent = batches scheduled but not sent when sending stopped: the server pushing back "
    "(gRPC flow control) or the generator saturated — see gen CPU % and notes. undelivered "
    "(`lost`) = deliveries expected (sent x viewers) that had not arrived when the drain ended "
    "(at least drain_s, longer while deliveries still came, at most 10 s). late = delivered "
    "later than the scenario's p99 limit. drops = what the server itself reported dropping "
    "(edge gap events, echo counter, Mosquitto $SYS/broker/publish/messages/dropped). For the "
    "edge, `server` holds its own /metrics counters over the step; 'edge had not read N when "
    "sending stopped' means N batches were written but still queued in HTTP/2 flow-control "
    "windows and socket buffers: the edge falling behind without signalling it.",
    "CPU % is process CPU time over the step's wall time (100% = one core); SUT CPU sums the "
    "system-under-test processes (core + edge, echo, or mosquitto). cpu_contention per row is "
    "how busy the pinned CPUs were and how much of that was other processes (the machine is "
    "shared): a note says so from 15%, since it slows the system or delays the generator.",
)


def base_report(
    *,
    title: str,
    kind: str,
    machine: dict[str, Any],
    pinning: dict[str, Any],
    systems: dict[str, Any],
    scenarios: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    started_utc: str,
    finished_utc: str,
    elapsed_s: float,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    auto = [
        f"{r['name']}: generator-bound ({'; '.join(r['generator_bound']['reasons'])}), so "
        "this row measures the generator's limit as much as the system's."
        for r in rows
        if is_generator_bound(r)
    ]
    if any(r.get("viewer_tokens") == "minted" for r in rows):
        auto.append(
            "Viewer tokens were minted with the local core's key ring: Attach as a viewer "
            "needs a clinician login with the patient assigned, and there is no API yet to "
            "provision one. The edge checks these tokens exactly as Attach-issued ones."
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "title": title,
        "started_utc": started_utc,
        "finished_utc": finished_utc,
        "elapsed_s": round(elapsed_s, 1),
        "machine": {**machine, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "pinning": pinning,
        "systems": systems,
        "scenarios": scenarios,
        "runs": rows,
        "figures": {},
        "goals": [],
        "notes": [*STANDARD_NOTES, *notes, *auto],
        "plots": {},
    }


def path_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per row name: the headline numbers (the rest stays in `runs`)."""
    return {
        r["name"]: {
            "delivered_batches_per_s": round(r["delivered_batches_per_s"], 1),
            "offered_batches_per_s": round(r["offered_batches_per_s"], 1),
            "latency_ms": r["latency_ms"],
            "latency_lower_bound": r.get("latency_lower_bound", {}),
            "generator_bound": is_generator_bound(r),
            "not_sent": r.get("not_sent", r["scheduled"] - r["sent"]),
            "late": r.get("late", 0),
            "lost": r["lost"],
            "loss_ratio": r["loss_ratio"],
            "drops": r["drops"],
            "cpu": r["cpu"],
        }
        for r in rows
    }
