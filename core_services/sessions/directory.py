"""The session directory: opens, places, attaches, closes and re-places sessions; feeds watchers."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from core_services.archive.archive import Archive
from core_services.bus import Bus, LocalBus
from core_services.edges.registry import AssignSession, EdgeRegistry, ReleaseSession
from core_services.sessions.domain import (
    LiveReport,
    NoEdgeAvailable,
    Session,
    SessionState,
    ZoneLatency,
    choose_edge,
)
from core_services.store import SqlStore
from telehealth.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from telehealth.security.tokens import TokenIssuer
from telehealth.telemetry.metrics import CoreMetrics

log = logging.getLogger(__name__)

MAX_ID_LEN = 128
# How long a move waits for the new edge to confirm it holds the assignment.
READY_TIMEOUT_S = 2.0
# How long the old edge keeps a moving device's stream if the device never shows up anew.
HANDOVER_TIMEOUT_S = 10.0
WATCH_QUEUE = 4096
# An edge still reporting a session placed elsewhere is told again at most this often (its
# next heartbeats may have left before the release reached it).
RELEASE_RESEND_S = 1.0


class EventKind(Enum):
    SNAPSHOT = 1
    OPENED = 2
    MOVED = 3
    CLOSED = 4
    UPDATED = 5


@dataclass(frozen=True)
class SessionEvent:
    kind: EventKind
    session: Session
    live: LiveReport
    address: str
    unix_ns: int


@dataclass(frozen=True)
class Assignment:
    session_id: str
    edge_id: str
    edge_address: str
    token: str
    expires_unix_ns: int
    role: str


class WatcherFellBehind(ResourceExhausted):
    pass


class _Watcher:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.queue: asyncio.Queue[SessionEvent | None] = asyncio.Queue(WATCH_QUEUE)
        self.overflowed = False


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_LEN or not value.isprintable() or value.strip() != value:
        raise InvalidArgument(
            f"{name} must be 1-{MAX_ID_LEN} printable characters without surrounding spaces"
        )


class SessionDirectory:
    def __init__(
        self,
        store: SqlStore,
        registry: EdgeRegistry,
        issuer: TokenIssuer,
        latency: ZoneLatency,
        metrics: CoreMetrics,
        clock_ns: Callable[[], int] = time.time_ns,
        bus: Bus | None = None,
    ) -> None:
        self._bus: Bus = bus or LocalBus()
        self._store = store
        self._registry = registry
        self._issuer = issuer
        self._latency = latency
        self._metrics = metrics
        self._clock_ns = clock_ns
        self.sessions: dict[str, Session] = {}
        self.live: dict[str, LiveReport] = {}
        self._watchers: set[_Watcher] = set()
        self._lock = asyncio.Lock()
        self._waiters: dict[tuple[str, str, str], asyncio.Event] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.archive: Archive | None = None
        # (edge, session, kind) transitions already announced to other replicas.
        self._acked: set[tuple[str, str, str]] = set()
        # Make-before-break moves under way: session -> (old edge, monotonic deadline). The
        # old edge keeps the session until released, so its reports are not stale meanwhile.
        self._handovers: dict[str, tuple[str, float]] = {}
        # (edge, session) -> monotonic time a reconciling release was last sent.
        self._reconciled: dict[tuple[str, str], float] = {}
        registry.on_edge_dead = self._on_edge_dead
        registry.on_edge_connected = self._on_edge_connected

    async def load(self) -> None:
        """Recover open sessions after a core restart; edges re-report their live state."""
        for s in await self._store.open_sessions():
            self._cache(s)
        self._export()

    def _cache(self, s: Session) -> Session | None:
        """Keep the open-session cache and the per-edge placed counts in step; return the
        session as it was cached before."""
        old = self.sessions.pop(s.session_id, None)
        if old is not None:
            self._registry.placed[old.edge_id] = max(
                0, self._registry.placed.get(old.edge_id, 1) - 1
            )
        if s.state is SessionState.OPEN:
            self.sessions[s.session_id] = s
            self._registry.placed[s.edge_id] = self._registry.placed.get(s.edge_id, 0) + 1
        return old

    async def _announce(self, kind: EventKind, s: Session) -> None:
        """Tell local watchers, and the other replicas (which update their cache first)."""
        self._publish(kind, s)
        self._export()
        await self._bus.publish({"kind": "session", "event": kind.name, "session": s.to_dict()})

    async def _command(self, edge_id: str, command: AssignSession | ReleaseSession) -> None:
        """Deliver to the edge's heartbeat stream here, or through the replica holding it."""
        if self._registry.send(edge_id, command) or not self._bus.shared:
            return
        if isinstance(command, AssignSession):
            body: dict[str, object] = {
                "command": "assign",
                "session": command.session.to_dict(),
                "archived_seq": command.archived_seq,
            }
        else:
            body = {"command": "release", **asdict(command)}
        await self._bus.publish({"kind": "command", "edge": edge_id, **body})

    async def handle_event(self, event: dict[str, Any]) -> None:
        """An event from another core replica."""
        kind = event.get("kind")
        if kind == "session":
            s = Session.from_dict(event["session"])
            self._cache(s)
            if s.state is not SessionState.OPEN:
                self.live.pop(s.session_id, None)
            self._publish(EventKind[event["event"]], s)
            self._export()
        elif kind == "command":
            if event["command"] == "assign":
                cmd: AssignSession | ReleaseSession = AssignSession(
                    Session.from_dict(event["session"]), int(event["archived_seq"])
                )
            else:
                cmd = ReleaseSession(
                    event["session_id"],
                    event["reason"],
                    event["new_edge_id"],
                    event["new_edge_address"],
                )
            self._registry.send(event["edge"], cmd)
        elif kind == "ack":
            w = self._waiters.get((event["edge"], event["session_id"], event["what"]))
            if w is not None:
                w.set()
        elif kind == "edge":
            await self._registry.refresh()
        elif kind == "handover":
            self._handovers[event["session_id"]] = (
                event["edge"],
                time.monotonic() + float(event["for_s"]),
            )
        elif kind == "handover_done":
            self._handovers.pop(event["session_id"], None)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(
        self, *, patient_id: str, zone: str, spo2_scale: int, device_id: str
    ) -> tuple[Session, Assignment]:
        _check_id("patient_id", patient_id)
        _check_id("zone", zone)
        if device_id:
            _check_id("device_id", device_id)
        if spo2_scale not in (0, 1, 2):
            raise InvalidArgument(f"spo2_scale must be 1 or 2 (or unset for 1), got {spo2_scale}")
        async with self._lock:
            t0 = time.perf_counter()
            try:
                placement = choose_edge(self._registry.views(), zone, self._latency)
                if placement.fallback and self._bus.shared:
                    # Another replica may have just heard of an edge in this zone.
                    await self._registry.refresh()
                    placement = choose_edge(self._registry.views(), zone, self._latency)
            except NoEdgeAvailable:
                self._metrics.placements.labels("rejected").inc()
                raise
            finally:
                self._metrics.placement_duration.observe(time.perf_counter() - t0)
            self._metrics.placements.labels(
                "fallback_zone" if placement.fallback else "same_zone"
            ).inc()
            s = Session(
                session_id="ses_" + uuid.uuid4().hex,
                patient_id=patient_id,
                device_id=device_id,
                zone=zone,
                edge_id=placement.edge.edge_id,
                spo2_scale=spo2_scale or 1,
                state=SessionState.OPEN,
                opened_unix_ns=self._clock_ns(),
            )
            await self._store.add_session(s)
            self._cache(s)
        await self._assign_on_edge(s)
        log.info(
            "session opened",
            extra={
                "session": s.session_id,
                "edge": s.edge_id,
                "zone": zone,
                "fallback": placement.fallback,
            },
        )
        await self._announce(EventKind.OPENED, s)
        return s, self._assignment(s, "publisher")

    async def attach(
        self, session_id: str, role: str, unreachable_edge_id: str = ""
    ) -> tuple[Session, Assignment]:
        s = await self._open_session(session_id)
        # A device or viewer lost its stream: check the edge now rather than wait for the
        # heartbeat timeout, and re-place everything on it if it is gone.
        if (
            unreachable_edge_id
            and unreachable_edge_id == s.edge_id
            and not await self._registry.probe(unreachable_edge_id)
        ):
            await self._registry.mark_dead(
                [unreachable_edge_id], f"unreachable, reported by a client of {session_id}"
            )
            s = await self._open_session(session_id)
        return s, self._assignment(s, role)

    async def close(self, session_id: str) -> Session:
        async with self._lock:
            s = await self._open_session(session_id)
            s = replace(s, state=SessionState.CLOSED, closed_unix_ns=self._clock_ns())
            await self._store.save_session(s)
            self._cache(s)
        await self._command(s.edge_id, ReleaseSession(s.session_id, "closed"))
        log.info("session closed", extra={"session": session_id, "edge": s.edge_id})
        await self._announce(EventKind.CLOSED, s)
        self.live.pop(session_id, None)
        return s

    async def move(self, session_id: str, reason: str, from_edge: str = "") -> Session:
        """Re-place an open session away from its edge (a dead edge): break-before-make."""
        async with self._lock:
            s = await self._open_session(session_id)
            if from_edge and s.edge_id != from_edge:
                return s  # already moved by a concurrent report
            placement = choose_edge(
                self._registry.views(), s.zone, self._latency, exclude=frozenset({s.edge_id})
            )
            old = s.edge_id
            s = s.moved_to(placement.edge.edge_id)
            if not await self._store.move_session(s, old):
                return await self.get(session_id)  # another replica moved it first
            self._cache(s)
        self._metrics.migrations.labels(reason).inc()
        await self._assign_on_edge(s)
        await self._command(
            old, ReleaseSession(session_id, "moved", s.edge_id, placement.edge.address)
        )
        log.info(
            "session moved",
            extra={"session": session_id, "from": old, "to": s.edge_id, "reason": reason},
        )
        await self._announce(EventKind.MOVED, s)
        return s

    async def relocate(self, session_id: str, reason: str, zone: str = "") -> tuple[Session, bool]:
        """Move a live session make-before-break (zone change, drain): the new edge holds
        the assignment before the device is sent there or the old edge lets go."""
        if zone:
            _check_id("zone", zone)
        async with self._lock:
            s = await self._open_session(session_id)
            new_zone = zone or s.zone
            exclude = frozenset({s.edge_id}) if reason == "drain" else frozenset()
            placement = choose_edge(self._registry.views(), new_zone, self._latency, exclude)
            if placement.edge.edge_id == s.edge_id:
                if new_zone != s.zone:
                    s = replace(s, zone=new_zone)
                    await self._store.save_session(s)
                    self._cache(s)
                    await self._announce(EventKind.UPDATED, s)
                return s, False
            old = s.edge_id
            s = replace(s.moved_to(placement.edge.edge_id), zone=new_zone)
            # Before the move is visible anywhere: the old edge's reports of the session are
            # not stale until it is released there.
            await self._begin_handover(session_id, old)
            if not await self._store.move_session(s, old):
                await self._end_handover(session_id)
                raise FailedPrecondition(f"session {session_id} moved meanwhile; try again")
            self._cache(s)
        t0 = time.perf_counter()
        ready = self._waiter(s.edge_id, session_id, "assigned")
        await self._assign_on_edge(s)
        try:
            await asyncio.wait_for(ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "new edge slow to confirm", extra={"session": session_id, "edge": s.edge_id}
            )
        finally:
            self._waiters.pop((s.edge_id, session_id, "assigned"), None)
        release = ReleaseSession(session_id, "moved", s.edge_id, placement.edge.address)
        if reason == "zone_change":
            # The device switches itself; the old edge keeps its stream until the new one has it.
            task = asyncio.create_task(self._release_when_published(old, s.edge_id, release))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            await self._command(old, release)
            await self._end_handover(session_id)
        self._metrics.migrations.labels(reason).inc()
        log.info(
            "session relocated",
            extra={
                "session": session_id,
                "from": old,
                "to": s.edge_id,
                "reason": reason,
                "ready_ms": round((time.perf_counter() - t0) * 1000, 1),
            },
        )
        await self._announce(EventKind.MOVED, s)
        return s, True

    async def _release_when_published(self, old: str, new: str, release: ReleaseSession) -> None:
        published = self._waiter(new, release.session_id, "publisher")
        try:
            await asyncio.wait_for(published.wait(), HANDOVER_TIMEOUT_S)
        except TimeoutError:
            pass
        finally:
            self._waiters.pop((new, release.session_id, "publisher"), None)
        await self._command(old, release)
        await self._end_handover(release.session_id)

    async def _begin_handover(self, session_id: str, old_edge: str) -> None:
        for_s = READY_TIMEOUT_S + HANDOVER_TIMEOUT_S + 5.0
        self._handovers[session_id] = (old_edge, time.monotonic() + for_s)
        if self._bus.shared:
            await self._bus.publish(
                {"kind": "handover", "session_id": session_id, "edge": old_edge, "for_s": for_s}
            )

    async def _end_handover(self, session_id: str) -> None:
        if self._handovers.pop(session_id, None) is not None and self._bus.shared:
            await self._bus.publish({"kind": "handover_done", "session_id": session_id})

    async def drain(self, edge_id: str) -> int:
        """Move every session off a draining edge; return how many moved."""
        moved = 0
        for sid in [s.session_id for s in self.sessions_on(edge_id)]:
            try:
                _, did = await self.relocate(sid, "drain")
                moved += int(did)
            except NoEdgeAvailable:
                log.error("nowhere to drain session to", extra={"session": sid, "from": edge_id})
        return moved

    def _ack(self, edge_id: str, session_id: str, what: str) -> None:
        w = self._waiters.get((edge_id, session_id, what))
        if w is not None:
            w.set()
        key = (edge_id, session_id, what)
        if self._bus.shared and key not in self._acked:
            # Whoever waits for this edge may be another replica: tell them, once.
            self._acked.add(key)
            task = asyncio.create_task(
                self._bus.publish(
                    {"kind": "ack", "edge": edge_id, "session_id": session_id, "what": what}
                )
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _waiter(self, edge_id: str, session_id: str, kind: str) -> asyncio.Event:
        return self._waiters.setdefault((edge_id, session_id, kind), asyncio.Event())

    async def _on_edge_connected(self, edge_id: str) -> None:
        # Other replicas learn of the edge now, not at their next look at the store.
        await self._bus.publish({"kind": "edge", "edge": edge_id})

    async def _on_edge_dead(self, edge_id: str) -> None:
        for sid in [sid for sid, s in self.sessions.items() if s.edge_id == edge_id]:
            try:
                await self.move(sid, "edge_dead", from_edge=edge_id)
            except NoEdgeAvailable:
                log.error("no edge to take over session", extra={"session": sid, "from": edge_id})

    async def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is not None:
            return s
        _check_id("session_id", session_id)
        stored = await self._store.get_session(session_id)
        if stored is None:
            raise NotFound(f"no session {session_id!r}")
        return stored

    async def _open_session(self, session_id: str) -> Session:
        s = await self.get(session_id)
        if s.state is not SessionState.OPEN:
            raise FailedPrecondition(f"session {session_id} is closed")
        return s

    def open_list(self, *, zone: str = "", edge_id: str = "") -> list[Session]:
        return [
            s
            for s in sorted(self.sessions.values(), key=lambda s: s.opened_unix_ns)
            if (not zone or s.zone == zone) and (not edge_id or s.edge_id == edge_id)
        ]

    async def list_with_closed(self) -> list[Session]:
        return await self._store.list_sessions(include_closed=True)

    def sessions_on(self, edge_id: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.edge_id == edge_id]

    def address_of(self, s: Session) -> str:
        e = self._registry.edges.get(s.edge_id)
        return "" if e is None else e.address

    # -- live reports from edges -----------------------------------------------------------

    def apply_report(self, edge_id: str, session_id: str, report: LiveReport) -> None:
        if report.assigned:
            self._ack(edge_id, session_id, "assigned")
        if report.publishers:
            self._ack(edge_id, session_id, "publisher")
        s = self.sessions.get(session_id)
        if s is None or s.edge_id != edge_id:
            return  # a stale report from an edge the session has left
        prev = self.live.get(session_id)
        self.live[session_id] = report
        if prev is None or (prev.news2_total, prev.news2_band) != (
            report.news2_total,
            report.news2_band,
        ):
            self._publish(EventKind.UPDATED, s, report)

    async def reconcile(self, edge_id: str, session_ids: list[str]) -> None:
        """An edge reported the sessions it holds: release every one the directory places on
        another edge (with that edge, so the device moves there at once) or has closed.
        This is what ends a split brain after an edge the core declared dead comes back."""
        now = time.monotonic()
        for sid in session_ids:
            s = self.sessions.get(sid)
            if s is not None and s.edge_id == edge_id:
                continue
            handover = self._handovers.get(sid)
            if handover is not None:
                if now >= handover[1]:
                    del self._handovers[sid]  # its mover is gone (a replica that stopped)
                elif handover[0] == edge_id:
                    continue  # the old edge of a make-before-break move keeps it until released
            key = (edge_id, sid)
            if now - self._reconciled.get(key, -math.inf) < RELEASE_RESEND_S:
                continue
            # The cache may lag another replica's move: the store decides.
            stored = await self._store.get_session(sid) if len(sid) <= MAX_ID_LEN else None
            if stored is not None and stored.state is SessionState.OPEN:
                if stored.edge_id == edge_id:
                    continue
                address = ""
                e = self._registry.edges.get(stored.edge_id)
                if e is not None:
                    address = e.address
                release = ReleaseSession(sid, "moved", stored.edge_id, address)
            else:
                release = ReleaseSession(sid, "closed")
            if len(self._reconciled) > 10_000:
                self._reconciled = {
                    k: t for k, t in self._reconciled.items() if now - t < RELEASE_RESEND_S
                }
            self._reconciled[key] = now
            self._metrics.reconciled_releases.inc()
            log.warning(
                "edge holds a session placed elsewhere; releasing it there",
                extra={
                    "edge": edge_id,
                    "session": sid,
                    "placed_on": release.new_edge_id or "closed",
                },
            )
            await self._command(edge_id, release)

    # -- watch ------------------------------------------------------------------------------

    async def watch(self, session_id: str = "") -> AsyncIterator[SessionEvent]:
        if session_id:
            await self.get(session_id)
        w = _Watcher(session_id)
        self._watchers.add(w)
        self._metrics.watchers.set(len(self._watchers))
        try:
            snapshot = [self.sessions[session_id]] if session_id in self.sessions else []
            if not session_id:
                snapshot = self.open_list()
            for s in snapshot:
                yield self._event(EventKind.SNAPSHOT, s, self.live.get(s.session_id, LiveReport()))
            while True:
                ev = await w.queue.get()
                if ev is None:
                    raise WatcherFellBehind(
                        f"watch fell more than {WATCH_QUEUE} events behind; watch again for a "
                        "fresh snapshot"
                    )
                yield ev
        finally:
            self._watchers.discard(w)
            self._metrics.watchers.set(len(self._watchers))

    def _event(self, kind: EventKind, s: Session, live: LiveReport) -> SessionEvent:
        return SessionEvent(kind, s, live, self.address_of(s), self._clock_ns())

    def _publish(self, kind: EventKind, s: Session, live: LiveReport | None = None) -> None:
        ev = self._event(kind, s, live or self.live.get(s.session_id, LiveReport()))
        for w in self._watchers:
            if w.overflowed or (w.session_id and w.session_id != s.session_id):
                continue
            if w.queue.qsize() >= WATCH_QUEUE - 1:
                w.overflowed = True
                w.queue.put_nowait(None)
            else:
                w.queue.put_nowait(ev)

    # -- helpers ----------------------------------------------------------------------------

    def _assignment(self, s: Session, role: str) -> Assignment:
        token, exp = self._issuer.issue(
            session_id=s.session_id,
            role=role,
            edge_id=s.edge_id,
            zone=s.zone,
            spo2_scale=s.spo2_scale,
        )
        return Assignment(
            session_id=s.session_id,
            edge_id=s.edge_id,
            edge_address=self.address_of(s),
            token=token,
            expires_unix_ns=exp,
            role=role,
        )

    async def _assign_on_edge(self, s: Session) -> None:
        await self._command(s.edge_id, await self.assignment_command(s))

    async def assignment_command(self, s: Session) -> AssignSession:
        archived = await self.archive.archived_seq(s.session_id) if self.archive else 0
        return AssignSession(s, archived)

    def _export(self) -> None:
        # From the per-edge placed counts (kept by _cache), so the cost follows the number
        # of edges, not of sessions: at 100,000 sessions a walk over them dominated Open.
        zones: dict[str, int] = {}
        for e in self._registry.edges.values():
            zones[e.zone] = zones.get(e.zone, 0) + self._registry.placed.get(e.edge_id, 0)
        for z, n in zones.items():
            self._metrics.open_sessions.labels(z).set(n)
