"""telehealth-mesh: the whole mesh on this machine as local processes (core + one edge per zone)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telehealth.rpc import secure_channel
from telehealth.security.pki import DEFAULT_CLIENTS, files_for, init_pki
from telehealth.security.tls import TlsFiles

if TYPE_CHECKING:
    from core_services.sessions.domain import Session

DEFAULT_ZONES = ("zone-a", "zone-b", "zone-c")
# Zone latency of the local demo: a line a - b - c.
DEMO_LATENCY = {"zone-a": {"zone-b": 5.0, "zone-c": 12.0}, "zone-b": {"zone-c": 6.0}}


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Ports this process has handed out, so two children started in one run never get the same one.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port for a child process to listen on.

    Not bind(0): that port is ephemeral, and between our close and the child's bind the kernel
    may give it to any outgoing connection on the machine (CI saw EADDRINUSE that way). A port
    below the ephemeral range is never handed out by the kernel, so once it is checked free
    here only another explicit listener can take it.
    """
    lo, hi = _ephemeral_range()
    candidates = range(10000, lo) if lo > 11000 else range(hi + 1, 65536)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(candidates)
        if port not in _handed_out and _port_free(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {candidates.start}-{candidates.stop - 1}")


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    grpc_address: str = ""
    metrics_url: str = ""
    zone: str = ""
    popen: subprocess.Popen[bytes] | None = None
    # Client certificate the launcher probes health with when the mesh runs mTLS.
    health_tls: TlsFiles | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # A new session so Ctrl-C in the terminal reaches the launcher, which stops children
        # in order (devices, edges, core) instead of all at once.
        self.popen = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class LocalMesh:
    """Starts the core and one edge per zone as subprocesses on loopback and waits until healthy."""

    data_dir: Path
    zones: Sequence[str] = DEFAULT_ZONES
    core_port: int = 0
    edge_base_port: int = 0
    http_base_port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    # mTLS on every link, certificates from a local CA under data_dir/pki (make demo sets it).
    tls: bool = False
    # Several core replicas sharing one PostgreSQL database (cluster mode) when > 1.
    core_replicas: int = 1
    database_url: str = ""
    # Extra command-line flags for every edge (e.g. ["--media-pixel-budget", "1e12"]).
    edge_args: list[str] = field(default_factory=list)
    core: Proc | None = None
    cores: list[Proc] = field(default_factory=list)
    edges: list[Proc] = field(default_factory=list)
    devices: list[Proc] = field(default_factory=list)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEHEALTH_")}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _port(self, base: int, offset: int) -> int:
        return base + offset if base else free_port()

    def start_core(self, replica: int = 0) -> Proc:
        port = (self.core_port + replica if self.core_port else 0) or free_port()
        http = free_port() if replica else self._port(self.http_base_port, 0)
        latency = repr(DEMO_LATENCY).replace("'", '"')
        name = "core" if self.core_replicas == 1 else f"core-{replica}"
        cluster: list[str] = []
        if self.database_url:
            cluster += ["--database-url", self.database_url]
        if self.core_replicas > 1:
            cluster += ["--cluster", "true", "--keys-dir", str(self.data_dir / "keys")]
        p = Proc(
            name,
            [
                sys.executable, "-m", "core_services.main",
                "--grpc-listen", f"127.0.0.1:{port}",
                "--http-listen", f"127.0.0.1:{http}",
                "--data-dir", str(self.data_dir / name),
                *self._tls_args("core"),
                "--zone-latency-ms", latency,
                *cluster,
            ],
            self.data_dir / "logs" / f"{name}.log",
            grpc_address=f"127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{http}/metrics",
        )  # fmt: skip
        p.start(self._env())
        self.cores.append(p)
        if self.core is None:
            self.core = p
        return p

    def core_target(self, i: int = 0) -> str:
        """The core as one client should dial it: with replicas, every address, starting
        from a different one per client (gRPC's pick_first moves on when one fails)."""
        addrs = [c.grpc_address for c in self.cores]
        if len(addrs) == 1:
            return addrs[0]
        k = i % len(addrs)
        return "ipv4:" + ",".join(addrs[k:] + addrs[:k])

    def start_edge(self, i: int, zone: str, edge_id: str | None = None) -> Proc:
        assert self.core is not None
        port = self._port(self.edge_base_port, i)
        http = self._port(self.http_base_port, 1 + i)
        name = edge_id or f"edge-{zone.removeprefix('zone-')}"
        p = Proc(
            name,
            [
                sys.executable, "-m", "edge_nodes.main",
                "--edge-id", name,
                "--zone", zone,
                "--grpc-listen", f"127.0.0.1:{port}",
                "--http-listen", f"127.0.0.1:{http}",
                "--core-address", self.core_target(i),
                "--data-dir", str(self.data_dir / name),
                *self._tls_args(name),
                *self.edge_args,
            ],
            self.data_dir / "logs" / f"{name}.log",
            grpc_address=f"127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{http}/metrics",
            zone=zone,
        )  # fmt: skip
        p.start(self._env())
        self.edges.append(p)
        return p

    def start_devices(self, patients: int, scenario: str = "mixed", batch_ms: float = 40) -> Proc:
        assert self.core is not None
        p = Proc(
            f"devices-{len(self.devices) + 1}",
            [
                sys.executable, "-m", "clients.device",
                "--core", self.core.grpc_address,
                "--patients", str(patients),
                "--patient", "patient",
                "--zones", ",".join(self.zones),
                "--scenario", scenario,
                "--batch-ms", str(batch_ms),
                *self._tls_args("device"),
            ],
            self.data_dir / "logs" / f"devices-{len(self.devices) + 1}.log",
        )  # fmt: skip
        p.start(self._env())
        self.devices.append(p)
        return p

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    def client_tls(self, name: str) -> TlsFiles | None:
        return files_for(self.pki_dir, name) if self.tls else None

    def _tls_args(self, name: str) -> list[str]:
        f = self.client_tls(name)
        if f is None:
            return []
        return ["--tls-cert-file", str(f.cert), "--tls-key-file", str(f.key),
                "--tls-ca-file", str(f.ca)]  # fmt: skip

    async def start(self, timeout: float = 30.0) -> None:
        try:
            await self._start(timeout)
        except BaseException:
            # Whatever did start must not outlive a failed start-up.
            self.stop()
            raise

    async def _start(self, timeout: float) -> None:
        if self.tls:
            # Idempotent: an existing CA and certificates are kept across runs.
            edges = [f"edge-{z.removeprefix('zone-')}" for z in self.zones]
            init_pki(self.pki_dir, services=["core", *edges], clients=DEFAULT_CLIENTS)
        for replica in range(self.core_replicas):
            # One after another: the first creates the shared signing key, the rest load it.
            p = self.start_core(replica)
            p.health_tls = self.client_tls("operator")
            await wait_healthy(p, timeout)
        for i, zone in enumerate(self.zones):
            self.start_edge(i, zone)
        for e in self.edges:
            e.health_tls = self.client_tls("operator")
            await wait_healthy(e, timeout)

    def kill(self, p: Proc) -> None:
        """SIGKILL, as a crash would: no graceful shutdown, no goodbye to the core."""
        if p.popen is not None and p.alive():
            p.popen.kill()
            p.popen.wait()

    def terminate(self, p: Proc, timeout: float = 10.0) -> None:
        if p.popen is not None and p.alive():
            p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    async def restart(self, p: Proc, timeout: float = 30.0) -> None:
        """Start a stopped process again with the same arguments, data and ports."""
        p.start(self._env())
        await wait_healthy(p, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM devices, then edges, then the core; SIGKILL whatever outlives the timeout."""
        for group in (self.devices, self.edges, self.cores):
            for p in group:
                if p.alive():
                    assert p.popen is not None
                    p.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in group:
                if p.popen is None:
                    continue
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()


async def wait_healthy(p: Proc, timeout: float) -> None:
    """Poll grpc.health.v1 until SERVING; fail early, with the log's tail, if the process died."""
    deadline = time.monotonic() + timeout
    async with secure_channel(p.grpc_address, p.health_tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if not p.alive():
                tail = p.log_path.read_text(errors="replace")[-2000:] if p.log_path.exists() else ""
                raise RuntimeError(f"{p.name} exited during start-up; log tail:\n{tail}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.name} not healthy at {p.grpc_address} after {timeout}s")
            await asyncio.sleep(0.1)


async def opened_since(mesh: LocalMesh, since_ns: int, want: int, timeout: float) -> list[Session]:
    """Sessions the demo's devices opened in this run, read from the core's store (SQLite)
    as they appear, so the summary can name a real one to watch."""
    from core_services.store import SqlStore

    store = SqlStore(f"sqlite+aiosqlite:///{mesh.data_dir / 'core' / 'core.db'}")
    await store.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            found = [
                s
                for s in await store.list_sessions(include_closed=False)
                if s.opened_unix_ns >= since_ns
            ]
            if len(found) >= want or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await store.close()


def _tls_exports(tls: TlsFiles | None) -> list[str]:
    """The shell lines that give telehealth-ctl this certificate (none with TLS off)."""
    if tls is None:
        return []
    return [
        f"  export TELEHEALTH_TLS_CERT_FILE={tls.cert}",
        f"  export TELEHEALTH_TLS_KEY_FILE={tls.key}",
        f"  export TELEHEALTH_TLS_CA_FILE={tls.ca}",
    ]


def _summary(mesh: LocalMesh, patients: int, sessions: Sequence[Session] = ()) -> str:
    """What runs where, then commands that work as printed (TLS, login first), in order."""
    from clients.demo_users import CLINICIAN, OPERATOR

    assert mesh.core is not None
    core = mesh.core.grpc_address
    lines = [
        "",
        "telehealth-mesh is up (local processes on loopback"
        + (", mTLS on every link):" if mesh.tls else "):"),
        f"  core    {core:<18} metrics {mesh.core.metrics_url}   pid {mesh.core.pid}",
    ]
    for e in mesh.edges:
        lines.append(
            f"  {e.name:<7} {e.grpc_address:<18} metrics {e.metrics_url}   pid {e.pid}  ({e.zone})"
        )
    lines += [
        f"  devices {patients} simulated patients over {', '.join(mesh.zones)} "
        "(every third one deteriorating)",
        f"  logs    {mesh.data_dir / 'logs'}",
        "",
        "Watch a patient from another terminal; each line runs as printed:",
    ]
    if sys.prefix != sys.base_prefix:
        lines.append(f"  . {Path(sys.prefix) / 'bin' / 'activate'}")
    lines += _tls_exports(mesh.client_tls("clinician"))
    password = mesh.data_dir / "demo-password"
    ctl = f"telehealth-ctl --core {core}"
    lines += [
        f"  {ctl} login {CLINICIAN} --password-stdin < {password}",
        f"  {ctl} sessions",
    ]
    # A deteriorating patient (every third) is the one worth watching.
    pick = next((s for s in sessions if s.patient_id.endswith(("3", "6", "9"))), None)
    pick = pick or (sessions[0] if sessions else None)
    if pick is not None:
        lines.append(f"  {ctl} watch {pick.session_id}")
        lines.append(f"    (that is {pick.patient_id}; any SESSION of the list works)")
    else:
        lines.append(f"  {ctl} watch SESSION")
        lines.append("    (SESSION: one of the ids `sessions` lists)")
    lines.append("As the operator (edges and drain; operators see no vitals):")
    lines += _tls_exports(mesh.client_tls("operator"))
    lines += [
        f"  {ctl} login {OPERATOR} --password-stdin < {password}",
        f"  {ctl} edges",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="telehealth-mesh",
        description="Run the whole telehealth mesh on this machine: a core, one edge node per "
        "zone and simulated patients, as local processes. Ctrl-C stops it all.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the mesh and keep it running until Ctrl-C")
    up.add_argument("--data-dir", type=Path, default=Path("var/mesh"), help="state and logs")
    up.add_argument("--zones", default=",".join(DEFAULT_ZONES), help="comma-separated zones")
    up.add_argument("--patients", type=int, default=6, help="simulated patients (0 for none)")
    up.add_argument("--core-port", type=int, default=50051, help="core gRPC port (0 = any)")
    up.add_argument("--edge-base-port", type=int, default=50061, help="first edge port (0 = any)")
    up.add_argument("--http-base-port", type=int, default=9100, help="first metrics port (0 = any)")
    up.add_argument("--fresh", action="store_true", help="forget sessions from earlier runs")
    ns = parser.parse_args(argv)
    zones = [z.strip() for z in ns.zones.split(",") if z.strip()]
    if not zones:
        parser.error("--zones needs at least one zone")
    if ns.patients < 0:
        parser.error("--patients cannot be negative")
    for port in [
        ns.core_port,
        *[ns.edge_base_port + i for i in range(len(zones)) if ns.edge_base_port],
    ]:
        if port and not _port_free(port):
            parser.error(f"port {port} is in use (another mesh running?); pass other ports or 0")
    if ns.fresh:
        import shutil

        shutil.rmtree(ns.data_dir, ignore_errors=True)
    mesh = LocalMesh(
        # Absolute, so the paths the summary prints work from any directory.
        ns.data_dir.resolve(),
        zones,
        core_port=ns.core_port,
        edge_base_port=ns.edge_base_port,
        http_base_port=ns.http_base_port,
        tls=True,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too: closing the terminal must stop the children, not orphan them.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        print("starting core and edges ...", flush=True)
        await mesh.start()
        started_ns = time.time_ns()
        if ns.patients:
            mesh.start_devices(ns.patients)
        from clients.demo_users import demo_security

        security = await demo_security(mesh, ns.patients)
        sessions = await opened_since(mesh, started_ns, min(ns.patients, 3), timeout=10)
        print(_summary(mesh, ns.patients, sessions), flush=True)
        print(security + "\n\nCtrl-C stops everything.", flush=True)
        while not stop.is_set():
            for p in [mesh.core, *mesh.edges, *mesh.devices]:
                if p is not None and not p.alive():
                    print(f"{p.name} exited (code {p.popen.returncode if p.popen else '?'}); "
                          f"see {p.log_path}", file=sys.stderr, flush=True)  # fmt: skip
                    stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    code = 0
    try:
        asyncio.run(run())
    except (RuntimeError, TimeoutError) as e:
        print(f"telehealth-mesh: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        pass  # Ctrl-C before the loop could take it (start-up): stop all the same
    except OSError as e:
        # Printing the summary failed (stdout closed): stop all the same.
        code = 1
        with contextlib.suppress(OSError):
            print(f"telehealth-mesh: {e}", file=sys.stderr)
    finally:
        # A second Ctrl-C while stopping must not leave children running: the stop has its
        # own deadline, after which whatever is left gets SIGKILL.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _say("\nstopping ...")
        mesh.stop()
        _say("stopped; nothing left running.")
    sys.exit(code)


def _say(text: str) -> None:
    # Stdout may be gone (terminal closed, a pipe's reader exited): the children must be
    # stopped all the same, so a failed print is no reason to skip mesh.stop().
    with contextlib.suppress(OSError):
        print(text, flush=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


if __name__ == "__main__":
    main()
