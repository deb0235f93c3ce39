"""telehealth-ctl: operator and clinician command line for a running mesh."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

from clients.ctl_security import (
    add_commands,
    bearer_interceptors,
    cmd_login,
    local_commands,
    run_local,
    saved_token,
)
from clients.tlsflags import add_tls_flags, tls_from_flags
from telehealth.rpc import bearer, channel_options, secure_channel
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    edges_pb2,
    edges_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)

BANDS = {0: "-", 1: "low", 2: "low-medium", 3: "medium", 4: "high"}
EDGE_STATES = {0: "?", 1: "healthy", 2: "draining", 3: "dead"}
EXIT_USAGE = 2
EXIT_RPC = 1


def age(unix_ns: int, now_ns: int | None = None) -> str:
    if not unix_ns:
        return "-"
    s = ((now_ns or time.time_ns()) - unix_ns) / 1e9
    if s < 0:
        s = 0.0
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    return f"{s / 60:.0f}m"


def table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


async def cmd_sessions(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    stub = sessions_pb2_grpc.SessionsServiceStub(ch)
    resp = await stub.List(
        sessions_pb2.ListSessionsRequest(zone=ns.zone or "", include_closed=ns.all), timeout=5
    )
    rows = [["SESSION", "PATIENT", "ZONE", "EDGE", "NEWS2", "RISK", "SEQ", "UPDATED", "STATE"]]
    for s in resp.sessions:
        rows.append(
            [
                s.session_id,
                s.patient_id,
                s.zone,
                s.edge_id,
                str(s.news2_total) if s.news2_unix_ns else "-",
                BANDS.get(s.news2_band, "?"),
                str(s.last_seq),
                age(s.news2_unix_ns) + " ago" if s.news2_unix_ns else "-",
                "open" if s.state == sessions_pb2.SESSION_STATE_OPEN else "closed",
            ]
        )
    table(rows, out)
    out.write(f"{len(resp.sessions)} session(s)\n")
    return 0


async def cmd_edges(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    stub = edges_pb2_grpc.EdgesServiceStub(ch)
    resp = await stub.ListEdges(edges_pb2.ListEdgesRequest(zone=ns.zone or ""), timeout=5)
    rows = [
        [
            "EDGE",
            "ZONE",
            "ADDRESS",
            "STATE",
            "SESSIONS",
            "CAPACITY",
            "SUBSCRIBERS",
            "CPU",
            "HEARTBEAT",
        ]
    ]
    for e in resp.edges:
        rows.append(
            [
                e.edge_id,
                e.zone,
                e.address,
                EDGE_STATES.get(e.state, "?"),
                str(e.placed_sessions),
                str(e.load.capacity_sessions),
                str(e.load.subscribers),
                f"{e.load.cpu_percent:.0f}%",
                age(e.last_heartbeat_unix_ns) + " ago",
            ]
        )
    table(rows, out)
    return 0


async def cmd_drain(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    stub = edges_pb2_grpc.EdgesServiceStub(ch)
    t0 = time.monotonic()
    # Draining moves every session away (each make-before-break) before it answers.
    resp = await stub.Drain(
        edges_pb2.DrainEdgeRequest(edge_id=ns.edge, draining=not ns.undo), timeout=ns.timeout
    )
    state = EDGE_STATES.get(resp.edge.state, "?")
    if ns.undo:
        out.write(f"edge {resp.edge.edge_id}: {state}, placeable again\n")
    elif resp.edge.placed_sessions == 0:
        out.write(
            f"edge {resp.edge.edge_id}: {state} and empty "
            f"(sessions moved in {time.monotonic() - t0:.1f}s)\n"
        )
    else:
        out.write(
            f"edge {resp.edge.edge_id}: {state}, {resp.edge.placed_sessions} session(s) could "
            "not be moved (no other edge with capacity); they stay until one is\n"
        )
    if ns.cordon:
        from clients.kube import cordon_zone_nodes

        nodes = await asyncio.to_thread(
            cordon_zone_nodes, resp.edge.zone, ns.kubeconfig, not ns.undo
        )
        verb = "uncordoned" if ns.undo else "cordoned"
        out.write(f"{verb} node(s) of {resp.edge.zone}: {', '.join(nodes) or 'none found'}\n")
    return 0


async def cmd_export(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    stub = archive_pb2_grpc.ArchiveServiceStub(ch)
    call = stub.ExportFhir(
        archive_pb2.ExportFhirRequest(
            patient_id=ns.patient,
            from_unix_ns=int(ns.since * 1e9) if ns.since else 0,
            to_unix_ns=int(ns.until * 1e9) if ns.until else 0,
        ),
        timeout=600,
    )
    # The core sends the record as pages of Bundles; the file is one Bundle of all their
    # entries, written as the pages come so a long stay never sits in memory whole.
    sink: TextIO = out
    tmp: Path | None = None
    if ns.out:
        tmp = Path(ns.out).with_name(Path(ns.out).name + ".partial")
        sink = tmp.open("w", encoding="utf-8")
    n = 0
    try:
        async for page in call:
            doc = json.loads(page.bundle_json)
            if page.page == 1:
                head = json.dumps({k: v for k, v in doc.items() if k != "entry"})
                sink.write(head[:-1] + ', "entry": [')
            for e in doc.get("entry", []):
                sink.write(("," if n else "") + "\n" + json.dumps(e, separators=(",", ":")))
                n += 1
            if ns.out and page.page % 10 == 0:
                print(f"  {n} observation(s) so far ...", file=sys.stderr, flush=True)
        sink.write("\n]}\n")
    except BaseException:
        if tmp is not None:
            sink.close()
            tmp.unlink(missing_ok=True)  # never leave half an export looking like a file
        raise
    if tmp is not None:
        sink.close()
    if tmp is not None:
        tmp.replace(ns.out)  # only a complete export takes the file's name
        out.write(f"{n} observation(s) of {ns.patient} written to {ns.out}\n")
    return 0


async def cmd_close(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    stub = sessions_pb2_grpc.SessionsServiceStub(ch)
    resp = await stub.Close(sessions_pb2.CloseSessionRequest(session_id=ns.session), timeout=5)
    out.write(f"session {resp.session.session_id} closed\n")
    return 0


@dataclass
class WatchView:
    """What `watch` shows: the latest of each kind of value, each with its age."""

    session_id: str
    edge_id: str = ""
    vitals: vitals_pb2.VitalSigns | None = None
    vitals_received_ns: int = 0
    news2: vitals_pb2.News2Update | None = None
    derived: vitals_pb2.DerivedHeartRate | None = None
    last_seq: int = 0
    alerts: list[tuple[int, str]] = field(default_factory=list)
    gaps: int = 0
    notice: str = ""

    def apply(self, ev: vitals_pb2.SubscribeVitalsResponse) -> None:
        kind = ev.WhichOneof("event")
        if kind == "batch":
            self.last_seq = max(self.last_seq, ev.batch.seq)
            if ev.batch.vitals:
                self.vitals = ev.batch.vitals[-1]
                self.vitals_received_ns = ev.edge_received_unix_ns
        elif kind == "news2":
            self.news2 = ev.news2
        elif kind == "derived_heart_rate":
            self.derived = ev.derived_heart_rate
        elif kind == "alert":
            self.alerts.append((ev.alert.raised_unix_ns, ev.alert.message))
            self.alerts = self.alerts[-5:]
        elif kind == "gap":
            self.gaps += ev.gap.dropped_events

    def render(self, now_ns: int) -> str:
        v = self.vitals
        lines = [f"session {self.session_id} on {self.edge_id}   last seq {self.last_seq}"]
        if self.notice:
            lines.append(f"  ! {self.notice}")
        if self.news2 is not None:
            n = self.news2
            lines.append(
                f"  NEWS2 {n.total:>2}  risk {BANDS.get(n.band, '?'):<10}"
                f"{'' if n.complete else ' (incomplete)'}  age {age(n.computed_unix_ns, now_ns)}"
            )
        else:
            lines.append("  NEWS2  -   waiting for vitals")
        if v is not None:
            a = age(v.device_time_unix_ns, now_ns)

            def f(present: bool, value: float, fmt: str) -> str:
                return format(value, fmt) if present else "-"

            lines += [
                f"  heart rate    {f(v.HasField('heart_rate_bpm'), v.heart_rate_bpm, '.0f'):>6} bpm   age {a}",
                f"  SpO2          {f(v.HasField('spo2_percent'), v.spo2_percent, '.0f'):>6} %     "
                f"{'on oxygen' if v.oxygen_support == vitals_pb2.OXYGEN_SUPPORT_SUPPLEMENTAL else 'air'}",
                f"  respiration   {f(v.HasField('respiration_rate_bpm'), v.respiration_rate_bpm, '.0f'):>6} /min",
                f"  blood press.  {f(v.HasField('systolic_mmhg'), v.systolic_mmhg, '.0f'):>6}/"
                f"{f(v.HasField('diastolic_mmhg'), v.diastolic_mmhg, '.0f')} mmHg",
                f"  temperature   {f(v.HasField('temperature_c'), v.temperature_c, '.1f'):>6} °C",
                f"  consciousness {vitals_pb2.Consciousness.Name(v.consciousness).removeprefix('CONSCIOUSNESS_').lower()}",
            ]
        if self.derived is not None:
            d = self.derived
            lines.append(
                f"  ECG heart rate {d.ecg_heart_rate_bpm:>5.0f} bpm ({d.r_peaks} R-peaks)   "
                f"age {age(d.computed_unix_ns, now_ns)}"
            )
        if self.gaps:
            lines.append(f"  {self.gaps} event(s) skipped because this view fell behind")
        for t, msg in self.alerts:
            lines.append(f"  alert {age(t, now_ns):>6} ago: {msg}")
        return "\n".join(lines)


async def cmd_watch(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    sessions = sessions_pb2_grpc.SessionsServiceStub(ch)
    view = WatchView(ns.session)
    deadline = time.monotonic() + ns.duration if ns.duration else None
    tty = out.isatty()

    async def draw() -> None:
        while True:
            text = view.render(time.time_ns())
            if tty:
                out.write("\x1b[H\x1b[J" + text + "\n")
            else:
                out.write(text + "\n\n")
            out.flush()
            await asyncio.sleep(ns.refresh)

    drawer = asyncio.create_task(draw())
    try:
        while deadline is None or time.monotonic() < deadline:
            a = await sessions.Attach(
                sessions_pb2.AttachSessionRequest(
                    session_id=ns.session, role=sessions_pb2.ROLE_VIEWER
                ),
                timeout=5,
            )
            view.edge_id = a.assignment.edge_id
            view.notice = ""
            async with secure_channel(a.assignment.edge_address, ns.tls) as edge:
                stub = vitals_pb2_grpc.VitalsServiceStub(edge)
                call = stub.Subscribe(
                    vitals_pb2.SubscribeVitalsRequest(session_id=ns.session, include_latest=True),
                    metadata=bearer(a.assignment.token),
                )
                try:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    async with asyncio.timeout(remaining):
                        async for ev in call:
                            view.apply(ev)
                except TimeoutError:
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() not in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.UNAVAILABLE,
                    ):
                        raise
                    # The session moved or its edge went away: follow it through the core.
                    view.notice = f"{e.details()} — following"
                    await asyncio.sleep(0.2)
                finally:
                    call.cancel()
    finally:
        drawer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drawer
        out.write(view.render(time.time_ns()) + "\n")
    return 0


COMMANDS = {
    "sessions": cmd_sessions,
    "edges": cmd_edges,
    "drain": cmd_drain,
    "close": cmd_close,
    "export": cmd_export,
    "watch": cmd_watch,
    "login": cmd_login,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telehealth-ctl",
        description="Look at and steer a running telehealth mesh: list sessions and edges, watch a "
        "patient's live vitals and NEWS2, drain an edge, close a session.",
    )
    p.add_argument("--core", default="127.0.0.1:50051", help="core gRPC address (host:port)")
    add_tls_flags(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("sessions", help="list live sessions with their edge and latest NEWS2")
    s.add_argument("--zone", help="only this zone")
    s.add_argument("--all", action="store_true", help="include closed sessions")
    e = sub.add_parser("edges", help="list edge nodes, their state and load")
    e.add_argument("--zone", help="only this zone")
    d = sub.add_parser("drain", help="stop placing new sessions on an edge")
    d.add_argument("edge", help="edge id, as in `telehealth-ctl edges`")
    d.add_argument("--undo", action="store_true", help="make the edge placeable again")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the moves")
    d.add_argument(
        "--cordon",
        action="store_true",
        help="also cordon (or with --undo uncordon) the Kubernetes node(s) of the edge's zone",
    )
    d.add_argument("--kubeconfig", help="kubeconfig for --cordon (default: the usual lookup)")
    c = sub.add_parser("close", help="close a session")
    c.add_argument("session", help="session id")
    x = sub.add_parser("export", help="a patient's archived vitals as a FHIR R4 Bundle (JSON)")
    x.add_argument("patient", help="pseudonymous patient id")
    x.add_argument("--since", type=float, default=0.0, help="from this unix time (seconds)")
    x.add_argument("--until", type=float, default=0.0, help="up to this unix time (seconds)")
    x.add_argument("--out", help="write to this file instead of standard output")
    w = sub.add_parser("watch", help="show one patient's vitals, NEWS2 and alerts live")
    w.add_argument("session", help="session id, as in `telehealth-ctl sessions`")
    w.add_argument("--refresh", type=float, default=0.25, help="seconds between redraws")
    w.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.tls = tls_from_flags(parser, ns)

    async def run() -> int:
        # The login token (from `telehealth-ctl login` or TELEHEALTH_TOKEN) goes with every call.
        token = saved_token()
        interceptors = bearer_interceptors(token) if token else None
        async with secure_channel(ns.core, ns.tls, channel_options(), interceptors) as ch:
            return await COMMANDS[ns.command](ch, ns, out)

    try:
        code = run_local(ns, out) if ns.command in local_commands() else asyncio.run(run())
    except grpc.aio.AioRpcError as e:
        hint = ""
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            hint = f" (is the core running at {ns.core}? start one with `make demo`)"
        print(f"telehealth-ctl: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        code = EXIT_RPC
    except KeyboardInterrupt:
        code = 130
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
