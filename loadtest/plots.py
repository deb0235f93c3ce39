"""PNG plots of a report: latency CDF per path, latency against offered load, throughput, drops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

COLOURS = {
    "edge": "#d62728",
    "echo": "#1f77b4",
    "mqtt-qos0": "#2ca02c",
    "mqtt-qos1": "#9467bd",
}


def _colour(path: str) -> str:
    return COLOURS.get(path, "#7f7f7f")


def latency_cdf(rows: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """Latency against percentile on a 'nines' axis, so the tail is as readable as the median."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for r in rows:
        pts = r["latency_cdf_ms"]
        if not pts:
            continue
        n = seen.get(r["path"], 0)
        seen[r["path"]] = n + 1
        # x = 1/(1-q): 90% -> 10, 99% -> 100, 99.9% -> 1000
        xs = [1 / max(1e-5, 1 - q / 100) for _, q in pts]
        ys = [max(v, 1e-3) for v, _ in pts]
        ax.plot(xs, ys, styles[n % 4], color=_colour(r["path"]), label=r["name"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 10, 100, 1000, 10000])
    ax.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (scheduled send to subscriber receipt)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _ring_p99(
    ax: Axes, rows: Sequence[dict[str, Any]], marker: str, size: float, colour: str, label: str
) -> None:
    """Ring these rows' p99 points on the latency-load plot (nothing when there are none)."""
    if rows:
        ax.plot(
            [r["offered_batches_per_s"] for r in rows],
            [r["latency_ms"]["p99"] for r in rows],
            marker,
            ms=size,
            mfc="none",
            color=colour,
            label=label,
        )


def latency_vs_load(rows: Sequence[dict[str, Any]], out: Path, limit_ms: float = 50.0) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    for path, rs in by_path.items():
        rs = sorted(rs, key=lambda r: r["offered_batches_per_s"])
        xs = [r["offered_batches_per_s"] for r in rs]
        ax.plot(
            xs, [r["latency_ms"]["p99"] for r in rs], "o-", color=_colour(path), label=f"{path} p99"
        )
        ax.plot(
            xs,
            [r["latency_ms"]["p50"] for r in rs],
            "x--",
            color=_colour(path),
            alpha=0.6,
            label=f"{path} p50",
        )
    # Lower bounds (batches never sent or delivered counted at the time given up on) and
    # generator-bound rows, marked so the curve is not read as exact there.
    lb = [r for r in rows if r.get("latency_lower_bound", {}).get("p99")]
    _ring_p99(ax, lb, "^", 11, "k", "p99 only a lower bound (≥)")
    gb = [r for r in rows if r.get("generator_bound", {}).get("bound")]
    _ring_p99(ax, gb, "s", 12, "#7f7f7f", "generator-bound")
    ax.axhline(limit_ms, color="k", lw=0.8, ls=":", label=f"{limit_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered batches/s")
    ax.set_ylabel("latency, ms")
    ax.set_title("Latency against offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out  # fmt: skip


def throughput_timeline(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        tl = r["timeline"]
        ax.plot(
            [t["t_s"] for t in tl],
            [t["delivered"] for t in tl],
            color=_colour(r["path"]),
            label=f"{r['name']} delivered",
        )
        ax.plot(
            [t["t_s"] for t in tl],
            [t["sent"] for t in tl],
            color=_colour(r["path"]),
            ls=":",
            alpha=0.6,
        )
    ax.set_xlabel("seconds into the run (dotted: sent by schedule)")
    ax.set_ylabel("batches per second")
    ax.set_title("Throughput over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def drops(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["name"] for r in rows]
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs], [r["lost"] for r in rows], 0.4, label="lost (sent, never delivered)"
    )
    ax.bar(
        [x + 0.2 for x in xs], [r["drops"] for r in rows], 0.4, label="drops the server reported"
    )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("batches / events")
    ax.set_title("Loss and drops")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out  # fmt: skip


def memory_timeline(results: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    """RSS of every process over each generator run (the soak's memory figure, drawn)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    for res in results:
        tl = res.get("rss_timeline") or []
        names = sorted({n for _, row in tl for n in row})
        for k, name in enumerate(names):
            pts = [(t / 60, row[name]) for t, row in tl if name in row]
            ax.plot(
                [t for t, _ in pts],
                [v for _, v in pts],
                styles[k % 4],
                color=_colour(res.get("path", "")) if name != "generator" else "#7f7f7f",
                label=f"{res['label']}: {name}",
            )
    ax.set_xlabel("minutes into the run")
    ax.set_ylabel("RSS, MiB")
    ax.set_title(title or "Memory (RSS) per process")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def all_plots(
    prefix: Path,
    cdf_rows: Sequence[dict[str, Any]],
    load_rows: Sequence[dict[str, Any]],
    time_rows: Sequence[dict[str, Any]],
    drop_rows: Sequence[dict[str, Any]],
    cdf_title: str = "Latency distribution per path",
    limit_ms: float = 50.0,
) -> dict[str, Path]:
    """The four plots as `<prefix>-<name>.png`; returns {suffix: file} for linking."""
    files = {
        "-latency-cdf.png": latency_cdf(cdf_rows, Path(f"{prefix}-latency-cdf.png"), cdf_title),
        "-latency-vs-load.png": latency_vs_load(
            load_rows, Path(f"{prefix}-latency-vs-load.png"), limit_ms
        ),
        "-throughput.png": throughput_timeline(time_rows, Path(f"{prefix}-throughput.png")),
        "-drops.png": drops(drop_rows, Path(f"{prefix}-drops.png")),
    }
    return files
