"""Placement benchmark: SessionsService.Open latency with 1,000 edges and 100,000 live sessions.

`serve` builds that state inside a real CoreServer (sessions bulk-inserted through the store's
engine before start so the directory loads them as after a restart; edges registered through
the registry's connect()/heartbeat as heartbeat streams would) and serves gRPC on loopback.
`time` runs in another process and times Opens over real gRPC, then reads the core's own
histogram of the placement decision (telehealth_core_placement_decision_seconds) from its
/metrics. Both are started by `run_placement()`, the server pinned with the SUT, the client
with the generator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.host import Pinning, cpu_between, sample

ZONES = 10


async def _build_and_serve(data_dir: Path, edges: int, sessions_n: int) -> None:
    from core_services.server import CoreServer
    from core_services.sessions.domain import Session, SessionState
    from core_services.store import _session_values  # the store's own row mapping
    from core_services.tables import sessions
    from telehealth.config import CoreSettings

    settings = CoreSettings.model_validate(
        {
            "grpc_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "data_dir": data_dir,
            "log_level": "WARNING",
            "log_format": "text",
            # The 1,000 edges are registry entries, not processes: they heartbeat from a task
            # below, and the long timeout keeps a slow build from declaring them dead.
            "heartbeat_timeout_s": 3600,
        }
    )
    t0 = time.monotonic()
    core = CoreServer(settings)
    await core.store.start()
    now = time.time_ns()
    per_edge = max(1, sessions_n // edges)
    rows = [
        _session_values(
            Session(
                session_id=f"ses_bench_{i:08d}",
                patient_id=f"bench-patient-{i:08d}",
                zone=f"zone-{(i // per_edge) % ZONES}",
                edge_id=f"edge-{(i // per_edge) % edges:04d}",
                spo2_scale=1,
                state=SessionState.OPEN,
                opened_unix_ns=now,
                device_id=f"bench-device-{i:08d}",
            )
        )
        for i in range(sessions_n)
    ]
    for lo in range(0, len(rows), 5000):
        async with core.store.engine.begin() as conn:
            await conn.execute(sessions.insert(), rows[lo : lo + 5000])
    del rows
    await core.start()
    for e in range(edges):
        edge_id = f"edge-{e:04d}"
        await core.edges.connect(edge_id, f"zone-{e % ZONES}", f"127.0.0.1:{20000 + e}", 1000)
    stop = asyncio.Event()

    async def heartbeats() -> None:
        while not stop.is_set():
            for e in range(edges):
                core.edges.heartbeat(
                    f"edge-{e:04d}",
                    active_sessions=per_edge,
                    subscribers=0,
                    capacity=1000,
                    cpu_percent=20.0,
                    batches_in_total=0,
                )
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    hb = asyncio.create_task(heartbeats())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = {
        "address": core.address,
        "metrics_url": core.http.url + "/metrics",
        "build_s": round(time.monotonic() - t0, 2),
        "sessions_loaded": len(core.directory.sessions),
        "edges_registered": len(core.edges.edges),
    }
    print("READY " + json.dumps(state), flush=True)
    await stop.wait()
    await hb
    await core.stop(grace=0)


def _histogram(text: str, name: str) -> dict[str, Any]:
    """Count and bucket-bound quantiles (like PromQL's histogram_quantile, but the bucket's
    upper bound: a figure the decision is known to be under) of one histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for point in family.samples:
            if point.name == name + "_bucket":
                buckets.append((float(point.labels["le"]), point.value))
            elif point.name == name + "_count":
                total = point.value
    buckets.sort()

    def under(q: float) -> float | None:
        for le, cumulative in buckets:
            if total and cumulative >= q * total:
                return le
        return None

    def us(v: float | None) -> float | None:
        return None if v is None or v == float("inf") else round(v * 1e6, 1)

    return {"count": int(total), "p50_le_us": us(under(0.5)), "p99_le_us": us(under(0.99))}


async def _decision_figures(metrics_url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(metrics_url) as r:
        text = await r.text()
    return {
        "decision": _histogram(text, "telehealth_core_placement_decision_seconds"),
        "in_memory_placement": _histogram(text, "telehealth_core_placement_duration_seconds"),
    }


async def _time_opens(address: str, opens: int) -> dict[str, Any]:
    import grpc
    from hdrh.histogram import HdrHistogram

    from telehealth.rpc import channel_options
    from telehealth.v1 import sessions_pb2, sessions_pb2_grpc

    hist = HdrHistogram(1, 60_000_000, 3)
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address, options=channel_options()) as ch:
        stub = sessions_pb2_grpc.SessionsServiceStub(ch)
        # One warm-up call so connection set-up is not in the figures.
        await stub.Open(sessions_pb2.OpenSessionRequest(patient_id="warm-up", zone="zone-0"))
        t_start = time.monotonic()
        for i in range(opens):
            req = sessions_pb2.OpenSessionRequest(
                patient_id=f"bench-new-{i:06d}", zone=f"zone-{i % ZONES}"
            )
            t0 = time.perf_counter_ns()
            try:
                await stub.Open(req, timeout=30)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                continue
            hist.record_value(max(1, (time.perf_counter_ns() - t0) // 1000))
            if time.monotonic() - t_start > 120:
                break  # bounded in time as well as count
        wall = time.monotonic() - t_start
    result = {
        "opens": int(hist.get_total_count()),
        "errors": errors,
        "wall_s": round(wall, 3),
        "opens_per_s": round(hist.get_total_count() / wall, 1) if wall else 0.0,
        "latency_ms": {
            "p50": hist.get_value_at_percentile(50) / 1000,
            "p90": hist.get_value_at_percentile(90) / 1000,
            "p99": hist.get_value_at_percentile(99) / 1000,
            "p999": hist.get_value_at_percentile(99.9) / 1000,
            "max": hist.get_max_value() / 1000,
            "mean": round(hist.get_mean_value() / 1000, 3),
        },
    }
    return result


def run_placement(
    work_dir: Path, pinning: Pinning, edges: int = 1000, sessions_n: int = 100_000, opens: int = 500
) -> dict[str, Any]:
    """Build the state in a server process, time `opens` sequential Opens from a client process."""
    data = work_dir / "placement"
    data.mkdir(parents=True, exist_ok=True)
    cpus = ",".join(str(c) for c in sorted(pinning.sut))
    server = subprocess.Popen(
        [
            sys.executable, "-m", "loadtest.placement", "serve", "--data-dir", str(data),
            "--edges", str(edges), "--sessions", str(sessions_n), "--cpus", cpus,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()  # blocks until built; the server exits on failure
        if not line.startswith("READY "):
            raise RuntimeError(f"placement server failed to build its state: {line!r}")
        state = json.loads(line.removeprefix("READY "))
        out = data / "opens.json"
        before = sample(server.pid)
        t0 = time.monotonic()
        subprocess.run(
            [
                sys.executable, "-m", "loadtest.placement", "time", "--address", state["address"],
                "--metrics-url", state["metrics_url"], "--opens", str(opens), "--out", str(out),
                "--cpus", ",".join(str(c) for c in sorted(pinning.generator)),
            ],
            check=True,
            timeout=300,
        )  # fmt: skip
        cpu = cpu_between(before, sample(server.pid), time.monotonic() - t0)
        result: dict[str, Any] = json.loads(out.read_text())
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "edges": edges,
        "live_sessions": sessions_n,
        "state": state,
        "core_cpu": cpu,
        "method": "sequential Opens (one in flight) over gRPC on loopback; latency per call; "
        "server.decision: the core's histogram of the placement decision alone (bucket bounds)",
        **result,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.placement",
        description="Placement benchmark parts (run_placement() starts both).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="build the registry and session state, serve the core")
    s.add_argument("--data-dir", type=Path, required=True)
    s.add_argument("--edges", type=int, default=1000)
    s.add_argument("--sessions", type=int, default=100_000)
    s.add_argument("--cpus", default="")
    t = sub.add_parser("time", help="time Opens against a served core")
    t.add_argument("--address", required=True)
    t.add_argument("--metrics-url", default="", help="the core's /metrics, for its own figures")
    t.add_argument("--opens", type=int, default=500)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--cpus", default="")
    ns = parser.parse_args(argv)
    if ns.cpus:
        os.sched_setaffinity(0, {int(c) for c in ns.cpus.split(",")})
    if ns.command == "serve":
        asyncio.run(_build_and_serve(ns.data_dir, ns.edges, ns.sessions))
    else:
        result = asyncio.run(_time_opens(ns.address, ns.opens))
        if ns.metrics_url:
            result["server"] = asyncio.run(_decision_figures(ns.metrics_url))
        ns.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
