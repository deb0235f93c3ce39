"""Runs scenarios: starts the systems under test, pins them, drives generator processes, collects."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.mesh import LocalMesh
from loadtest.generator import GeneratorSpec, StepSpec
from loadtest.host import Pinning, pin_process, plan_pinning
from loadtest.peers.mosquitto import Broker, external_broker, start_broker
from loadtest.scenario import Scenario


@dataclass
class PathTarget:
    """Where a path's generator connects and which processes are the system under test."""

    path: str
    address: str
    pids: dict[str, int] = field(default_factory=dict)
    metrics_url: str = ""
    key_dir: str = ""


class Systems:
    """The systems under test for one run: a one-zone LocalMesh, the echo relay, a broker.

    Each is started on demand, pinned to the SUT CPUs, and stopped by `stop()`.
    """

    def __init__(
        self,
        work_dir: Path,
        pinning: Pinning,
        core_address: str = "",
        mqtt_address: str = "",
    ) -> None:
        self.work_dir = work_dir
        self.pinning = pinning
        self.core_address = core_address
        self.mqtt_address = mqtt_address
        self.mesh: LocalMesh | None = None
        self.echo: subprocess.Popen[str] | None = None
        self.broker: Broker | None = None
        self.targets: dict[str, PathTarget] = {}
        # Kept after stop(), for the report.
        self.description: dict[str, Any] = {"edge": None, "echo": None, "mosquitto_config": None}

    async def start(self, paths: Sequence[str]) -> None:
        if "edge" in paths:
            self.targets["edge"] = await self._start_edge()
            self.description["edge"] = (
                f"external mesh at {self.core_address}"
                if self.core_address
                else "one-zone LocalMesh: core + 1 edge as processes, default settings, both "
                "pinned to the SUT CPU (the core takes the edge's archive replication)"
            )
        if "echo" in paths:
            self.targets["echo"] = self._start_echo()
            self.description["echo"] = (
                "bare grpc.aio relay (loadtest.peers.echo): ack per batch, drop-oldest queue of "
                "256 per subscriber, no parsing/validation/scoring/journal"
            )
        if any(p.startswith("mqtt") for p in paths):
            b = self._start_broker()
            self.description["mosquitto_config"] = b.config
            self.description["mosquitto_address"] = b.address
            for p in paths:
                if p.startswith("mqtt"):
                    pids = {"mosquitto": b.pid} if b.pid else {}
                    self.targets[p] = PathTarget(p, b.address, pids)

    async def _start_edge(self) -> PathTarget:
        if self.core_address:
            # A mesh somewhere else: we can drive it but not see or pin its processes.
            return PathTarget("edge", self.core_address)
        self.mesh = LocalMesh(self.work_dir / "mesh", zones=("zone-a",))
        await self.mesh.start()
        assert self.mesh.core is not None
        edge = self.mesh.edges[0]
        for proc in (self.mesh.core, edge):
            pin_process(proc.pid, self.pinning.sut)
        return PathTarget(
            "edge",
            self.mesh.core.grpc_address,
            {"core": self.mesh.core.pid, "edge": edge.pid},
            edge.metrics_url,
            str(self.mesh.data_dir / "core" / "keys"),
        )

    def _start_echo(self) -> PathTarget:
        cpus = ",".join(str(c) for c in sorted(self.pinning.sut))
        self.echo = subprocess.Popen(
            [sys.executable, "-m", "loadtest.peers.echo", "--cpus", cpus],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.echo.stdout is not None
        line = self.echo.stdout.readline().strip()  # the relay prints its address once bound
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"echo relay failed to start: {line!r}")
        return PathTarget("echo", line.split()[1], {"echo": self.echo.pid})

    def _start_broker(self) -> Broker:
        if self.mqtt_address:
            self.broker = external_broker(self.mqtt_address)
        else:
            self.broker = start_broker(self.work_dir / "mosquitto")
            pin_process(self.broker.pid, self.pinning.sut)
        return self.broker

    def stop(self) -> None:
        """Stop everything started; a later start() brings up fresh ones."""
        if self.mesh is not None:
            self.mesh.stop()
            self.mesh = None
        if self.echo is not None and self.echo.poll() is None:
            self.echo.terminate()
            try:
                self.echo.wait(5)
            except subprocess.TimeoutExpired:
                self.echo.kill()
                self.echo.wait()
        self.echo = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        self.targets.clear()

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


def generator_timeout(spec: GeneratorSpec) -> float:
    # Setup (opening up to hundreds of sessions) plus every step with its drain, bisect
    # steps included, with a generous margin: a hung generator must not hang the suite.
    steps = sum(s.duration_s + s.ramp_s + spec.drain_s + 2 for s in spec.steps)
    extra = spec.bisect_steps * (max(s.duration_s for s in spec.steps) + spec.drain_s + 2)
    return 120.0 + steps + extra


async def run_generator(spec: GeneratorSpec, work_dir: Path) -> dict[str, Any]:
    """Run one generator process (stderr shows its progress) and return its result."""
    spec_file = work_dir / f"spec-{spec.label}.json"
    out_file = work_dir / f"out-{spec.label}.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.generator", str(spec_file), str(out_file)
    )
    try:
        code = await asyncio.wait_for(proc.wait(), generator_timeout(spec))
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"generator {spec.label} timed out") from None
    if code != 0 or not out_file.exists():
        raise RuntimeError(f"generator {spec.label} failed (exit {code})")
    result: dict[str, Any] = json.loads(out_file.read_text())
    return result


def specs_for(
    sc: Scenario,
    targets: dict[str, PathTarget],
    pinning: Pinning,
    run_id: str,
    progress: str,
    label_suffix: str = "",
) -> list[GeneratorSpec]:
    if sc.steps:
        steps = [StepSpec(n, sc.duration_s, 0.0) for n in sc.steps]
    else:
        steps = [StepSpec(sc.patients, sc.duration_s, sc.ramp_s)]
    specs = []
    for path in sc.paths:
        t = targets[path]
        specs.append(
            GeneratorSpec(
                label=f"{path}{label_suffix}",
                path=path,
                target=t.address,
                batch_rate_hz=sc.batch_rate_hz,
                ecg_hz=sc.ecg_hz,
                vitals_rate_hz=sc.vitals_rate_hz,
                steps=steps,
                viewers=sc.subscribers_per_patient,
                watched=sc.watched,
                connections=sc.connections,
                drain_s=sc.drain_s,
                edge_metrics_url=t.metrics_url,
                viewer_key_dir=t.key_dir,
                pids=t.pids,
                cpus=sorted(pinning.generator),
                sut_cpus=sorted(pinning.sut) if pinning.separated else [],
                progress=progress,
                run_id=run_id,
                p99_limit_ms=sc.p99_limit_ms if sc.steps else 0.0,
                bisect_steps=2 if sc.steps else 0,
                stop_after_failures=2 if sc.steps else 0,
                retry_failures=bool(sc.steps),
                late_ms=sc.p99_limit_ms,
                video_calls=sc.video_calls if path == "edge" else 0,
            )
        )
    return specs


async def run_specs(
    specs: Sequence[GeneratorSpec], work_dir: Path, parallel: bool
) -> list[dict[str, Any]]:
    if parallel:
        return list(await asyncio.gather(*(run_generator(s, work_dir) for s in specs)))
    return [await run_generator(s, work_dir) for s in specs]


@dataclass
class RunContext:
    """Everything one invocation shares: work dir, pinning, systems under test."""

    pinning: Pinning
    systems: Systems
    work_dir: Path
    run_id: str
    keep_work_dir: bool = False

    @staticmethod
    def create(core_address: str = "", mqtt_address: str = "") -> RunContext:
        work = Path(tempfile.mkdtemp(prefix="telehealth-loadtest-"))
        pinning = plan_pinning()
        return RunContext(
            pinning,
            Systems(work, pinning, core_address, mqtt_address),
            work,
            time.strftime("%H%M%S"),
        )

    def close(self) -> None:
        self.systems.stop()
        if not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


async def run_scenario(
    ctx: RunContext, sc: Scenario, progress: str = "tty", label_suffix: str = ""
) -> list[dict[str, Any]]:
    """Run every path of a scenario, one after another unless the scenario says at once."""
    missing = [p for p in sc.paths if p not in ctx.systems.targets]
    if missing:
        await ctx.systems.start(missing)
    specs = specs_for(
        sc, ctx.systems.targets, ctx.pinning, ctx.run_id + label_suffix, progress, label_suffix
    )
    results = await run_specs(specs, ctx.work_dir, sc.parallel_paths)
    for r in results:
        r["scenario"] = sc.name
    return results
