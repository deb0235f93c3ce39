"""Headline figures from report rows, with what each one can and cannot claim.

Shared by `telehealth-loadtest run` and `telehealth-bench`. Three things qualify a figure:
- a latency percentile may be a lower bound (batches never sent or never delivered count at
  the time they were given up on; the row's `latency_lower_bound` says which);
- a row may be generator-bound (the load generator, not the system, was the limit): its
  latency overstates the system's and its throughput understates what the system could do,
  so it is never called a ceiling;
- a maximum sustainable rate is a ceiling only when the first level that failed failed
  because of the system; otherwise it is a lower bound ("at least").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Memory is "flat" when the last window's mean RSS is within this of the first window's.
FLAT_MIB = 8.0
FLAT_PERCENT = 5.0


def is_generator_bound(row: dict[str, Any]) -> bool:
    if "generator_bound" not in row:  # a report from before the label: its CPU alone
        return float(row.get("generator_cpu_percent", 0.0)) >= 85.0
    return bool(row["generator_bound"].get("bound"))


# A failing level is not the system's ceiling when other processes took this much of its CPU.
CONTENDED_PERCENT = 25.0


def sut_contended(row: dict[str, Any]) -> float:
    """Percent of the system-under-test CPU other processes used in the row (0 if unknown)."""
    others = row.get("cpu_contention", {}).get("sut_cpus", {}).get("others_percent", 0.0)
    return float(others) if others >= CONTENDED_PERCENT else 0.0


def lower_bound(row: dict[str, Any], key: str) -> bool:
    return bool(row.get("latency_lower_bound", {}).get(key))


def fmt_ms(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_latency(row: dict[str, Any], key: str) -> str:
    """A latency figure as text, "≥" in front when it is only a lower bound."""
    return ("≥" if lower_bound(row, key) else "") + fmt_ms(row["latency_ms"][key])


def latency_figure(row: dict[str, Any]) -> dict[str, Any]:
    """p50/p99/p99.9/max of a row with its qualifiers."""
    keys = ("p50", "p99", "p999", "max")
    return {
        "latency_ms": {k: row["latency_ms"][k] for k in keys},
        "lower_bound": {k: lower_bound(row, k) for k in keys},
        "generator_bound": is_generator_bound(row),
    }


def max_sustainable(rows: Sequence[dict[str, Any]], label: str) -> dict[str, Any]:
    """The highest passing load below the lowest load at which every attempt failed.

    kind: "ceiling" when that failing level failed with the generator keeping up;
    "lower_bound" when no level failed (the ramp never saturated the system) or the failing
    level was generator-bound (the failure may be the generator's); "none" when nothing passed.
    """
    mine = [r for r in rows if r["label"] == label and "passes" in r]
    passed_levels = {r["patients"] for r in mine if r["passes"]}
    failed = [r for r in mine if r["patients"] not in passed_levels]
    first_fail = min(failed, key=lambda r: r["target_batches_per_s"], default=None)
    ceiling = first_fail["patients"] if first_fail else math.inf
    passing = [r for r in mine if r["passes"] and r["patients"] < ceiling]
    best = max(passing, key=lambda r: r["target_batches_per_s"], default=None)
    fail_attempts = [r for r in failed if first_fail and r["patients"] == first_fail["patients"]]
    gen_bound_fail = any(is_generator_bound(r) for r in fail_attempts)
    contended = max((sut_contended(r) for r in fail_attempts), default=0.0)
    if best is None:
        kind, why = "none", "no step passed"
    elif first_fail is None:
        kind, why = "lower_bound", "no step failed: the ramp did not saturate the system"
    elif gen_bound_fail:
        kind, why = (
            "lower_bound",
            f"the first failing level ({first_fail['patients']} patients) was generator-bound",
        )
    elif contended:
        kind, why = (
            "lower_bound",
            f"at the first failing level ({first_fail['patients']} patients) other processes "
            f"used {contended:.0f}% of the system-under-test CPU",
        )
    else:
        kind, why = "ceiling", "the next level failed with the generator keeping up"
    return {
        "batches_per_s": best["target_batches_per_s"] if best else 0.0,
        "patients": best["patients"] if best else 0,
        "p99_ms_there": best["latency_ms"]["p99"] if best else 0.0,
        "kind": kind,
        "why": why,
        "first_failing_batches_per_s": first_fail["target_batches_per_s"] if first_fail else 0.0,
        "first_failing_generator_bound": gen_bound_fail,
        "steps_run": sum(1 for r in rows if r["label"] == label),
    }


def fmt_sustainable(m: dict[str, Any]) -> str:
    prefix = "≥" if m.get("kind") == "lower_bound" else ""
    return f"{prefix}{m['batches_per_s']:.0f}"


def ratio(
    num: float, den: float, num_lower: bool, den_lower: bool, why: str = ""
) -> dict[str, Any]:
    """num/den where either may be only a lower bound of the true figure: a lower-bound
    numerator makes the ratio a lower bound, a lower-bound denominator an upper bound."""
    if den <= 0:
        return {"value": 0.0, "bound": "unknown", "why": "no denominator"}
    bound = {
        (False, False): "exact",
        (True, False): "lower_bound",
        (False, True): "upper_bound",
        (True, True): "unknown",
    }[(num_lower, den_lower)]
    return {"value": round(num / den, 3), "bound": bound, "why": why}


def fmt_ratio(r: dict[str, Any] | float) -> str:
    if not isinstance(r, dict):  # a report from before ratios carried their bound
        return f"{r:.0%}"
    mark = {"lower_bound": "≥", "upper_bound": "≤", "unknown": "~"}.get(r["bound"], "")
    return f"{mark}{r['value']:.0%}"


def sustainable_ratio(edge: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]:
    """Edge's maximum sustainable rate over the echo's, qualified by both figures' kinds."""
    why = []
    if edge["kind"] == "lower_bound":
        why.append(f"edge: {edge['why']}")
    if echo["kind"] == "lower_bound":
        why.append(f"echo: {echo['why']}")
    return ratio(
        edge["batches_per_s"],
        echo["batches_per_s"],
        edge["kind"] == "lower_bound",
        echo["kind"] == "lower_bound",
        "; ".join(why),
    )


def saturated(row: dict[str, Any]) -> bool:
    """Did the row fall short of sustaining what was offered: anything not sent or not
    delivered, or p99 over the limit (the same test as a ramp step's)?"""
    return bool(
        row.get("not_sent", row["scheduled"] - row["sent"]) > 0
        or row["lost"] > 0
        or row["latency_ms"]["p99"] >= row.get("late_ms", 50.0)
    )


def throughput_ratio(edge: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]:
    """Edge delivered/s over echo delivered/s at the same offered load."""
    r = ratio(
        edge["delivered_batches_per_s"],
        echo["delivered_batches_per_s"],
        is_generator_bound(edge),
        is_generator_bound(echo),
    )
    notes = []
    if not saturated(edge) and not saturated(echo):
        r["bound"] = "not_saturated"
        notes.append("both delivered all that was offered: the ratio says nothing of capacity")
    if is_generator_bound(edge):
        notes.append("edge row generator-bound")
    if is_generator_bound(echo):
        notes.append("echo row generator-bound")
    r["why"] = "; ".join(notes)
    return r


def compare_p99(edge: dict[str, Any], other: dict[str, Any]) -> bool | None:
    """Is the edge's p99 no worse than the other's? None when the rows cannot say."""
    if is_generator_bound(edge) or is_generator_bound(other):
        return None
    e, o = edge["latency_ms"]["p99"], other["latency_ms"]["p99"]
    e_lb, o_lb = lower_bound(edge, "p99"), lower_bound(other, "p99")
    if e <= o:
        return True if not e_lb else None
    return False if not o_lb else None


def equal_load(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per load level (patients) run on several paths: each path's latency with qualifiers,
    the edge/echo throughput ratio, and the edge against Mosquitto QoS 0 and QoS 1."""
    levels: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("bisect"):
            continue
        by_path = levels.setdefault(r["patients"], {})
        # A level tried twice (the ramp retries a failure) is represented by the attempt
        # that passed, as the ramp counts it; otherwise by the first.
        if r["path"] not in by_path or (r.get("passes") and not by_path[r["path"]].get("passes")):
            by_path[r["path"]] = r
    out: dict[str, Any] = {}
    for n, by_path in sorted(levels.items()):
        if len(by_path) < 2:
            continue
        f: dict[str, Any] = {
            "offered_batches_per_s": max(r["target_batches_per_s"] for r in by_path.values()),
            "paths": {
                p: {
                    **latency_figure(r),
                    "delivered_batches_per_s": round(r["delivered_batches_per_s"], 1),
                    "not_sent": r.get("not_sent", r["scheduled"] - r["sent"]),
                    "lost": r["lost"],
                    "late": r.get("late", 0),
                }
                for p, r in sorted(by_path.items())
            },
        }
        edge = by_path.get("edge")
        if edge is not None and "echo" in by_path:
            f["edge_to_echo_throughput_ratio"] = throughput_ratio(edge, by_path["echo"])
        for q in ("mqtt-qos0", "mqtt-qos1"):
            if edge is not None and q in by_path:
                other = by_path[q]
                f[f"edge_vs_{q}"] = {
                    "edge_p50_ms": edge["latency_ms"]["p50"],
                    "edge_p99_ms": edge["latency_ms"]["p99"],
                    f"{q}_p50_ms": other["latency_ms"]["p50"],
                    f"{q}_p99_ms": other["latency_ms"]["p99"],
                    "p99_difference_ms": round(
                        edge["latency_ms"]["p99"] - other["latency_ms"]["p99"], 3
                    ),
                    "edge_p99_no_worse": compare_p99(edge, other),
                }
        out[f"{n}_patients"] = f
    return out


def memory(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per generator run (path): RSS growth of every process over the run, with a verdict."""
    out: dict[str, Any] = {}
    for res in results:
        growth = res.get("memory_growth") or {}
        if not growth:
            continue
        procs = {}
        for name, g in growth.items():
            limit = max(FLAT_MIB, FLAT_PERCENT / 100 * g["first_mib"])
            procs[name] = {**g, "flat": g["growth_mib"] <= limit, "flat_limit_mib": round(limit, 2)}
        key = res["label"]
        if key in out:  # the same path in another scenario of the same report
            key = f"{res['label']}@{res.get('scenario', len(out))}"
        out[key] = procs
    return out


def memory_flat(mem: dict[str, Any], only: Sequence[str] = ()) -> bool | None:
    procs = [
        g
        for label, by_proc in mem.items()
        if not only or label in only
        for name, g in by_proc.items()
        if name != "generator"
    ]
    return all(g["flat"] for g in procs) if procs else None


def run_figures(
    results: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The figures of one `telehealth-loadtest run` (placement and video are added by it)."""
    figs: dict[str, Any] = {}
    labels = sorted({r["label"] for r in rows if "passes" in r})
    if labels:
        sat = {label: max_sustainable(rows, label) for label in labels}
        figs["max_sustainable"] = sat
        if "edge" in sat and "echo" in sat:
            figs["max_sustainable_edge_to_echo_ratio"] = sustainable_ratio(sat["edge"], sat["echo"])
    eq = equal_load(rows)
    if eq:
        figs["equal_load"] = eq
    mem = memory(results)
    if mem:
        figs["memory_growth"] = mem
        figs["memory_flat"] = memory_flat(mem)
    figs["generator_bound_rows"] = [r["name"] for r in rows if is_generator_bound(r)]
    return figs
