"""This machine: CPU pinning of processes, CPU time and memory per process, versions for reports."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the system under test and the load generator run on."""

    sut: frozenset[int]
    generator: frozenset[int]

    @property
    def separated(self) -> bool:
        return not (self.sut & self.generator)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sut_cpus": sorted(self.sut),
            "generator_cpus": sorted(self.generator),
            "separated": self.separated,
        }


def plan_pinning() -> Pinning:
    """The SUT on the first CPU, the generator on the rest, when there are at least two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(frozenset(cpus), frozenset(cpus))
    return Pinning(frozenset(cpus[:1]), frozenset(cpus[1:]))


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Pin every thread of `pid`: sched_setaffinity on a pid moves only its main thread, and
    gRPC starts its poller threads before we get to pin the process."""
    task_dir = Path(f"/proc/{pid}/task")
    tids = [int(t.name) for t in task_dir.iterdir()] if task_dir.is_dir() else [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


@dataclass
class CpuSample:
    user_s: float
    system_s: float
    rss_bytes: int


def sample(pid: int) -> CpuSample | None:
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        return CpuSample(
            t.user + t.children_user, t.system + t.children_system, p.memory_info().rss
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def cpu_between(a: CpuSample | None, b: CpuSample | None, wall_s: float) -> dict[str, float]:
    if a is None or b is None or wall_s <= 0:
        return {"user_s": 0.0, "system_s": 0.0, "cpu_percent": 0.0, "rss_mib": 0.0}
    user, system = b.user_s - a.user_s, b.system_s - a.system_s
    return {
        "user_s": round(user, 3),
        "system_s": round(system, 3),
        "cpu_percent": round(100 * (user + system) / wall_s, 1),
        "rss_mib": round(b.rss_bytes / 2**20, 1),
    }


def cpu_busy() -> list[float]:
    """Busy seconds (everything but idle and iowait) per CPU since boot."""
    return [sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in psutil.cpu_times(percpu=True)]


def contention(
    before: Sequence[float],
    after: Sequence[float],
    wall_s: float,
    cpus: Sequence[int],
    own_percent: float,
) -> dict[str, float]:
    """How busy `cpus` were over a window, and how much of that was not our processes'
    (`own_percent`, 100 = one core): on a shared machine, other work on the system-under-test
    CPU slows the system, and on the generator's CPU delays the generator."""
    if wall_s <= 0 or not cpus:
        return {"busy_percent": 0.0, "others_percent": 0.0}
    busy = sum(after[c] - before[c] for c in cpus if c < len(after) and c < len(before))
    busy_pct = 100 * busy / wall_s
    return {
        "busy_percent": round(busy_pct, 1),
        "others_percent": round(max(0.0, busy_pct - own_percent), 1),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def mosquitto_version(binary: str | None = None) -> str:
    exe = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        return "not installed"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("mosquitto version ").strip() or "unknown"


# The code that is measured; a change anywhere in these shows as "dirty".
MEASURED_DIRS = ("telehealth", "core_services", "edge_nodes", "clients", "loadtest", "proto")


def code_version(repo: Path | None = None) -> dict[str, Any]:
    """The git commit of the measured code, and whether it had uncommitted changes."""
    root = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.rstrip("\n")

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_DIRS)
    except (OSError, subprocess.SubprocessError):
        return {"commit": "", "dirty": False, "note": "not a git checkout"}
    files = [line[3:] for line in changed.splitlines() if line.strip()]
    return {
        "commit": commit,
        "dirty": bool(files),
        "changed_files": files[:30],
        "commit_time": git("show", "-s", "--format=%cI", "HEAD"),
    }


def machine_info() -> dict[str, Any]:
    """Machine and versions, plus the load average when the run starts (the box is shared)."""
    uname = platform.uname()
    return {
        "cpus": os.cpu_count() or 0,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "cpu_model": _cpu_model(),
        "kernel": f"{uname.system} {uname.release}",
        "python": sys.version.split()[0],
        "packages": {
            d: _version(d)
            for d in (
                "grpcio",
                "protobuf",
                "paho-mqtt",
                "hdrhistogram",
                "numpy",
                "psutil",
                "matplotlib",
                "scipy",
                "aiosqlite",
                "sqlalchemy",
                "aiortc",
                "av",
                "opencv-python-headless",
                "telehealth-mesh",
            )
        },
        "mosquitto": mosquitto_version(),
        "code": code_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
