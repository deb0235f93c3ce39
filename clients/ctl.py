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
from clients.viewer import Following, Interrupted, Missing, SessionViewer, ViewerEvent, VitalsEvent
from telehealth.rpc import channel_options, secure_channel
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    edges_pb2,
    edges_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
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


@dataclass(frozen=True)
class Reading:
    """One parameter's last known value and the device time it was measured."""

    value: float
    measured_unix_ns: int


# What `watch` shows of a reading, in order: field, label, format, unit.
NUMERIC_FIELDS = (
    ("heart_rate_bpm", "heart rate", ".0f", "bpm"),
    ("spo2_percent", "SpO2", ".0f", "%"),
    ("respiration_rate_bpm", "respiration", ".0f", "/min"),
    ("temperature_c", "temperature", ".1f", "°C"),
)
ENUM_FIELDS = ("consciousness", "oxygen_support")
NEWS2_LABELS = {
    "respiration_rate": "respiration",
    "spo2": "SpO2",
    "air_or_oxygen": "oxygen",
    "systolic_bp": "systolic BP",
    "pulse": "heart rate",
    "consciousness": "consciousness",
    "temperature": "temperature",
}


def _enum_label(field_name: str, value: int) -> str:
    if field_name == "consciousness":
        return vitals_pb2.Consciousness.Name(value).removeprefix("CONSCIOUSNESS_").lower()  # type: ignore[arg-type]
    if value == vitals_pb2.OXYGEN_SUPPORT_SUPPLEMENTAL:
        return "supplemental oxygen"
    return "air" if value == vitals_pb2.OXYGEN_SUPPORT_AIR else "-"


@dataclass
class WatchView:
    """What `watch` shows: the last known value of every parameter, each with its own age
    (a reading that lacks a parameter leaves its older value and age in place), NEWS2 as
    old as its oldest input, the ECG heart rate, alerts, and how the view is following."""

    session_id: str
    edge_id: str = ""
    readings: dict[str, Reading] = field(default_factory=dict)
    news2: vitals_pb2.News2Update | None = None
    derived: vitals_pb2.DerivedHeartRate | None = None
    last_seq: int = 0
    alerts: list[tuple[int, str]] = field(default_factory=list)
    gaps: int = 0
    filled: int = 0
    missing: int = 0
    notice: str = ""

    def apply(self, item: ViewerEvent | vitals_pb2.SubscribeVitalsResponse) -> None:
        """Take a SessionViewer event (or a raw edge event)."""
        if isinstance(item, Following):
            self.edge_id = item.edge_id
            self.notice = "" if item.reason in ("start", "expiry") else f"following: {item.reason}"
            return
        if isinstance(item, Interrupted):
            self.notice = item.message
            return
        if isinstance(item, Missing):
            self.missing += item.last_seq - item.first_seq + 1
            return
        if isinstance(item, VitalsEvent):
            if item.from_archive:
                self.filled += 1
            item = item.event
        ev = item
        kind = ev.WhichOneof("event")
        if kind == "batch":
            self.last_seq = max(self.last_seq, ev.batch.seq)
            for v in ev.batch.vitals:
                self._take(v)
            if self.notice.startswith("following"):
                self.notice = ""  # live again
        elif kind == "news2":
            self.news2 = ev.news2
        elif kind == "derived_heart_rate":
            self.derived = ev.derived_heart_rate
        elif kind == "alert":
            self.alerts.append((ev.alert.raised_unix_ns, ev.alert.message))
            self.alerts = self.alerts[-5:]
        elif kind == "gap":
            self.gaps += ev.gap.dropped_events

    def _take(self, v: vitals_pb2.VitalSigns) -> None:
        t = v.device_time_unix_ns

        def keep(name: str, value: float) -> None:
            old = self.readings.get(name)
            if old is None or t >= old.measured_unix_ns:
                self.readings[name] = Reading(value, t)

        for name, *_ in (*NUMERIC_FIELDS, ("systolic_mmhg",), ("diastolic_mmhg",)):
            if v.HasField(name):  # type: ignore[arg-type]
                keep(name, getattr(v, name))
        for name in ENUM_FIELDS:
            value = int(getattr(v, name))
            if value:  # 0: not reported in this reading
                keep(name, value)

    def _news2_line(self, now_ns: int) -> list[str]:
        n = self.news2
        if n is None:
            return ["  NEWS2  -   waiting for vitals"]
        counted = [p for p in n.parameters if not p.stale and p.measured_unix_ns]
        stale = [p for p in n.parameters if p.stale]
        # The score is as old as its oldest input (the edge says which; older edges do not,
        # then the parameters' own times tell, and failing that the time it was computed).
        oldest_ns = n.oldest_input_unix_ns or min(
            (p.measured_unix_ns for p in counted), default=n.computed_unix_ns
        )
        oldest = min(counted, key=lambda p: p.measured_unix_ns, default=None)
        newest = max((p.measured_unix_ns for p in counted), default=0)
        of = ""
        if oldest is not None and oldest.measured_unix_ns < newest:
            of = f" ({NEWS2_LABELS.get(oldest.parameter, oldest.parameter)})"
        line = (
            f"  NEWS2 {n.total:>2}  risk {BANDS.get(n.band, '?'):<10}"
            f"{'' if n.complete else ' (incomplete)'}  inputs up to {age(oldest_ns, now_ns)} old{of}"
        )
        out = [line]
        if stale:
            names = ", ".join(
                f"{NEWS2_LABELS.get(p.parameter, p.parameter)} ({age(p.measured_unix_ns, now_ns)})"
                for p in stale
            )
            out.append(f"    stale, left out of the score: {names}")
        return out

    def render(self, now_ns: int) -> str:
        lines = [f"session {self.session_id} on {self.edge_id or '-'}   last seq {self.last_seq}"]
        if self.notice:
            lines.append(f"  ! {self.notice}")
        lines += self._news2_line(now_ns)
        r = self.readings

        def row(label: str, text: str, measured: int | None) -> str:
            when = f"age {age(measured, now_ns)}" if measured else ""
            return f"  {label:<15}{text:>14}   {when}".rstrip()

        def enum_row(label: str, name: str) -> str:
            got = r.get(name)
            return row(
                label,
                _enum_label(name, int(got.value)) if got else "-",
                got.measured_unix_ns if got else None,
            )

        for name, label, fmt, unit in NUMERIC_FIELDS:
            got = r.get(name)
            text = f"{format(got.value, fmt)} {unit}" if got else "-"
            lines.append(row(label, text, got.measured_unix_ns if got else None))
            if name == "spo2_percent":
                lines.append(enum_row("oxygen", "oxygen_support"))
            if name == "respiration_rate_bpm":
                sbp, dbp = r.get("systolic_mmhg"), r.get("diastolic_mmhg")
                bp = f"{sbp.value:.0f}" if sbp else "-"
                bp += f"/{dbp.value:.0f}" if dbp else "/-"
                # The pair is as old as its older half.
                times = [x.measured_unix_ns for x in (sbp, dbp) if x is not None]
                lines.append(row("blood pressure", f"{bp} mmHg", min(times) if times else None))
        lines.append(enum_row("consciousness", "consciousness"))
        if self.derived is not None:
            d = self.derived
            lines.append(
                row(
                    "ECG heart rate",
                    f"{d.ecg_heart_rate_bpm:.0f} bpm",
                    d.computed_unix_ns,
                )
                + f"   ({d.r_peaks} R-peaks)"
            )
        if self.gaps:
            lines.append(f"  {self.gaps} live event(s) skipped because this view fell behind")
        if self.filled:
            lines.append(f"  {self.filled} batch(es) filled in from the archive after a gap")
        if self.missing:
            lines.append(f"  {self.missing} batch(es) missing (not in the archive yet)")
        for t, msg in self.alerts:
            lines.append(f"  alert {age(t, now_ns):>6} ago: {msg}")
        return "\n".join(lines)


async def cmd_watch(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    view = WatchView(ns.session)
    # The viewer follows the session through moves, edge loss and token expiry, retrying the
    # core when it is away; only refusals (not logged in, not your patient) end it.
    viewer = SessionViewer(ch, ns.session, tls=ns.tls)
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
    events = viewer.events()
    try:
        async with asyncio.timeout(ns.duration or None):
            async for ev in events:
                view.apply(ev)
    except TimeoutError:
        pass
    finally:
        await events.aclose()
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
    w = sub.add_parser(
        "watch",
        help="show one patient's vitals, NEWS2 and alerts live",
        description="Live view of one session: every parameter with its last value and its own "
        "age, NEWS2 with the age of its oldest input (stale inputs listed), the ECG heart "
        "rate and alerts. It follows the session when it moves to another edge (drain, zone "
        "change, edge failure), fills what it missed from the archive, and retries while the "
        "core is unreachable; a line starting with ! says what it is doing. Needs a "
        "clinician login (`telehealth-ctl login`).",
    )
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
        elif e.code() == grpc.StatusCode.UNAUTHENTICATED and ns.command != "login":
            hint = f" (log in first: telehealth-ctl --core {ns.core} login USER)"
        print(f"telehealth-ctl: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        code = EXIT_RPC
    except KeyboardInterrupt:
        code = 130
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
