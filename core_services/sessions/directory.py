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
from core_services.edges.registry import AssignSession, EdgeRegistry, MoveSession, ReleaseSession
from core_services.sessions.domain import (
    EdgeState,
    LiveReport,
    NoEdgeAvailable,
    Session,
    SessionState,
    ZoneLatency,
)
from core_services.store import SqlStore
from telehealth.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from telehealth.security.tokens import TokenIssuer
from telehealth.telemetry.metrics import CoreMetrics

log = logging.getLogger(__name__)

MAX_ID_LEN = 128
# How long a move waits for the new edge to confirm it holds the assignment.
READY_TIMEOUT_S = 2.0
# Edges a make-before-break move tries before it gives up (the session then stays put).
MOVE_ATTEMPTS = 3
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
    # Name the edge's certificate carries when edge_address is an IP ("": its host).
    edge_tls_server_name: str = ""


class WatcherFellBehind(ResourceExhausted):
    pass


class MoveNotConfirmed(Unavailable):
    """No new edge confirmed it holds the session in time: the session stays where it was."""


@dataclass
class Handover:
    """A make-before-break move under way: both edges may hold the session meanwhile."""

    old_edge: str
    new_edge: str
    reason: str
    deadline: float
    # The directory (store) places the session on new_edge: the old edge has been (or, if
    # it reconnects, is again) told the session is moving.
    committed: bool = False


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
        # Per edge, on its current stream here: the (session, kind) acknowledgements its
        # reports show now. Other replicas hear of each one as it appears, so one that waits
        # for an edge it has no stream to sees it too - again when a session comes back.
        self._acked: dict[str, tuple[object, set[tuple[str, str]]]] = {}
        # Make-before-break moves under way, by session. Both edges keep the session until
        # the old one is released, so neither's reports are stale meanwhile.
        self._handovers: dict[str, Handover] = {}
        # (edge, session) -> monotonic time a reconciling release was last sent.
        self._reconciled: dict[tuple[str, str], float] = {}
        registry.on_edge_dead = self._on_edge_dead
        registry.on_edge_connected = self._on_edge_connected

    async def load(self) -> None:
        """Recover open sessions after a core restart; edges re-report their live state."""
        for s in await self._store.open_sessions():
            self._cache(s)

    async def shutdown(self) -> None:
        """Stop what runs in the background (releases waiting for a publisher): the core is
        going away; an edge still holding such a session is released when it reconnects."""
        tasks = list(self._background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _cache(self, s: Session) -> Session | None:
        """Keep the open-session cache and the per-edge placed counts in step; return the
        session as it was cached before."""
        old = self.sessions.pop(s.session_id, None)
        if old is not None:
            self._registry.add_placed(old.edge_id, -1)
        if s.state is SessionState.OPEN:
            self.sessions[s.session_id] = s
            self._registry.add_placed(s.edge_id, 1)
        return old

    def _uncache(self, s: Session) -> None:
        if self.sessions.get(s.session_id) is s:
            del self.sessions[s.session_id]
            self._registry.add_placed(s.edge_id, -1)

    async def _announce(self, kind: EventKind, s: Session) -> None:
        """Tell local watchers, and the other replicas (which update their cache first)."""
        self._publish(kind, s)
        await self._bus.publish({"kind": "session", "event": kind.name, "session": s.to_dict()})

    async def _command(
        self, edge_id: str, command: AssignSession | ReleaseSession | MoveSession
    ) -> None:
        """Deliver to the edge's heartbeat stream here, or through the replica holding it."""
        if self._registry.send(edge_id, command) or not self._bus.shared:
            return
        if isinstance(command, AssignSession):
            body: dict[str, object] = {
                "command": "assign",
                "session": command.session.to_dict(),
                "archived_seq": command.archived_seq,
            }
        elif isinstance(command, MoveSession):
            body = {"command": "moving", **asdict(command)}
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
        elif kind == "command":
            cmd: AssignSession | ReleaseSession | MoveSession
            if event["command"] == "assign":
                cmd = AssignSession(Session.from_dict(event["session"]), int(event["archived_seq"]))
            elif event["command"] == "moving":
                cmd = MoveSession(event["session_id"], event["new_edge_id"], event["reason"])
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
        elif kind == "expect":
            # Another replica waits for this acknowledgement: if this replica hears the edge,
            # its next report that shows it is news again, even if it showed it before.
            acked = self._acked.get(event["edge"])
            if acked is not None:
                acked[1].discard((event["session_id"], event["what"]))
        elif kind == "edge":
            await self._registry.refresh()
        elif kind == "handover":
            self._handovers[event["session_id"]] = Handover(
                event["old_edge"],
                event["new_edge"],
                event["reason"],
                time.monotonic() + float(event["for_s"]),
                bool(event["committed"]),
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
                placement = self._registry.choose(zone, self._latency)
                if placement.fallback and self._bus.shared:
                    # Another replica may have just heard of an edge in this zone.
                    await self._registry.refresh()
                    t0 = time.perf_counter()
                    placement = self._registry.choose(zone, self._latency)
            except NoEdgeAvailable:
                self._metrics.placements.labels("rejected").inc()
                raise
            finally:
                self._metrics.placement_decision.observe(time.perf_counter() - t0)
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
            # Counted on its edge before the lock goes, so the next Open sees the load.
            self._cache(s)
        self._metrics.placement_duration.observe(time.perf_counter() - t0)
        try:
            await self._store.add_session(s)
        except BaseException:
            self._uncache(s)
            raise
        # A new session has nothing archived: no need to ask the archive.
        await self._command(s.edge_id, AssignSession(s, 0))
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
        if self._edge_dead(s.edge_id):
            # Left on a dead edge when nothing could take it (NoEdgeAvailable, a clear
            # UNAVAILABLE for the caller to retry) - or an edge has come since: go there.
            s = await self.move(session_id, "edge_dead", from_edge=s.edge_id)
        return s, self._assignment(s, role)

    def _edge_dead(self, edge_id: str) -> bool:
        # An edge the registry has never seen is not judged here (liveness does that).
        e = self._registry.edges.get(edge_id)
        return e is not None and e.state is EdgeState.DEAD

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
            placement = self._registry.choose(s.zone, self._latency, frozenset({s.edge_id}))
            old = s.edge_id
            s = s.moved_to(placement.edge.edge_id)
            if not await self._store.move_session(s, old):
                return await self.get(session_id)  # another replica moved it first
            self._cache(s)
        # A make-before-break move it was in is moot: its edges are told by the release
        # below and by reconcile().
        await self._end_handover(session_id)
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
        """Move a live session make-before-break (zone change, drain): the new edge confirms
        it holds the assignment before the directory places the session there; then the old
        edge is told the session is moving (its device and viewers switch over while it keeps
        serving them) and is released once the new edge has the publisher, or after
        HANDOVER_TIMEOUT_S. A new edge that never confirms is given up for another; when none
        does, the session stays where it was and MoveNotConfirmed says so."""
        if zone:
            _check_id("zone", zone)
        tried: list[str] = []
        while True:
            async with self._lock:
                s = await self._open_session(session_id)
                old, new_zone = s.edge_id, zone or s.zone
                exclude = frozenset({old, *tried}) if reason == "drain" else frozenset(tried)
                try:
                    placement = self._registry.choose(new_zone, self._latency, exclude)
                except NoEdgeAvailable:
                    if not tried:
                        raise
                    self._move_failed(session_id, reason, old, tried)
                    raise MoveNotConfirmed(
                        f"session {session_id} stays on {old}: no edge confirmed it within "
                        f"{READY_TIMEOUT_S}s (tried {', '.join(tried)}) and none other fits"
                    ) from None
                if placement.edge.edge_id == old:
                    if tried:
                        # The edge it was to move to never confirmed; the best one left is
                        # where it is: it stays (ChangeZone answers moved=false).
                        self._move_failed(session_id, reason, old, tried)
                    if new_zone != s.zone:
                        s = replace(s, zone=new_zone)
                        await self._store.save_session(s)
                        self._cache(s)
                        await self._announce(EventKind.UPDATED, s)
                    return s, False
                target = replace(s.moved_to(placement.edge.edge_id), zone=new_zone)
                # Before the new edge holds it: neither edge's reports are stale meanwhile.
                await self._begin_handover(session_id, old, target.edge_id, reason)
            t0 = time.perf_counter()
            if await self._confirmed_on(target):
                break
            tried.append(target.edge_id)
            self._metrics.move_attempts_unconfirmed.labels(reason).inc()
            log.warning(
                "new edge did not confirm the session in time; trying another",
                extra={"session": session_id, "edge": target.edge_id, "reason": reason},
            )
            await self._command(
                target.edge_id, ReleaseSession(session_id, "moved", old, self._address(old))
            )
            if len(tried) >= MOVE_ATTEMPTS:
                self._move_failed(session_id, reason, old, tried)
                raise MoveNotConfirmed(
                    f"session {session_id} stays on {old}: no edge confirmed it within "
                    f"{READY_TIMEOUT_S}s (tried {', '.join(tried)})"
                )
        async with self._lock:
            committed = await self._store.move_session(target, old)
            if committed:
                self._cache(target)
        if not committed:
            # Moved meanwhile (its old edge died, a concurrent move) or closed: undo here only
            # what this move did.
            await self._end_handover(session_id)
            now = await self.get(session_id)
            if now.edge_id != target.edge_id or now.state is not SessionState.OPEN:
                await self._command(
                    target.edge_id,
                    ReleaseSession(session_id, "moved", now.edge_id, self._address(now.edge_id)),
                )
            raise FailedPrecondition(f"session {session_id} moved meanwhile; try again")
        self._metrics.migrations.labels(reason).inc()
        release = ReleaseSession(session_id, "moved", target.edge_id, self._address(target.edge_id))
        # Waiting for the publisher starts before anyone is told to go there.
        published = await self._expect(target.edge_id, session_id, "publisher")
        await self._commit_handover(session_id)
        await self._command(old, MoveSession(session_id, target.edge_id, reason))
        task = asyncio.create_task(
            self._release_when_published(old, target.edge_id, release, published)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info(
            "session relocated",
            extra={
                "session": session_id,
                "from": old,
                "to": target.edge_id,
                "reason": reason,
                "ready_ms": round((time.perf_counter() - t0) * 1000, 1),
            },
        )
        await self._announce(EventKind.MOVED, target)
        return target, True

    async def _confirmed_on(self, target: Session) -> bool:
        """Assign the session on its would-be edge; True once that edge reports holding it."""
        key = (target.edge_id, target.session_id, "assigned")
        ready = await self._expect(*key)
        try:
            await self._assign_on_edge(target)
            await asyncio.wait_for(ready.wait(), READY_TIMEOUT_S)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.pop(key, None)

    def _move_failed(self, session_id: str, reason: str, stays_on: str, tried: list[str]) -> None:
        self._metrics.moves_failed.labels(reason).inc()
        log.error(
            "move failed: no edge confirmed the session; it stays where it was",
            extra={"session": session_id, "reason": reason, "edge": stays_on, "tried": tried},
        )
        task = asyncio.create_task(self._end_handover(session_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _address(self, edge_id: str) -> str:
        e = self._registry.edges.get(edge_id)
        return "" if e is None else e.address

    async def _release_when_published(
        self, old: str, new: str, release: ReleaseSession, published: asyncio.Event
    ) -> None:
        try:
            await asyncio.wait_for(published.wait(), HANDOVER_TIMEOUT_S)
        except TimeoutError:
            log.info(
                "no publisher on the new edge in time; releasing the old one anyway",
                extra={"session": release.session_id, "from": old, "to": new},
            )
        finally:
            if self._waiters.get((new, release.session_id, "publisher")) is published:
                del self._waiters[(new, release.session_id, "publisher")]
        now = await self._store.get_session(release.session_id)
        if now is not None and now.state is SessionState.OPEN and now.edge_id == old:
            return  # it came back to the old edge meanwhile: that edge keeps it
        await self._command(old, release)
        h = self._handovers.get(release.session_id)
        if h is not None and h.old_edge == old:
            await self._end_handover(release.session_id)

    async def _begin_handover(self, session_id: str, old: str, new: str, reason: str) -> None:
        for_s = MOVE_ATTEMPTS * READY_TIMEOUT_S + HANDOVER_TIMEOUT_S + 5.0
        self._handovers[session_id] = Handover(old, new, reason, time.monotonic() + for_s)
        await self._share_handover(session_id, for_s)

    async def _commit_handover(self, session_id: str) -> None:
        h = self._handovers.get(session_id)
        if h is not None:
            h.committed = True
            await self._share_handover(session_id, h.deadline - time.monotonic())

    async def _share_handover(self, session_id: str, for_s: float) -> None:
        h = self._handovers[session_id]
        if self._bus.shared:
            await self._bus.publish(
                {
                    "kind": "handover",
                    "session_id": session_id,
                    "old_edge": h.old_edge,
                    "new_edge": h.new_edge,
                    "reason": h.reason,
                    "for_s": for_s,
                    "committed": h.committed,
                }
            )

    async def _end_handover(self, session_id: str) -> None:
        if self._handovers.pop(session_id, None) is not None and self._bus.shared:
            await self._bus.publish({"kind": "handover_done", "session_id": session_id})

    def moves_from(self, edge_id: str) -> list[MoveSession]:
        """What an edge that (re)connects must hear again: sessions moving off it."""
        now = time.monotonic()
        return [
            MoveSession(sid, h.new_edge, h.reason)
            for sid, h in self._handovers.items()
            if h.old_edge == edge_id and h.committed and now < h.deadline
        ]

    async def drain(self, edge_id: str) -> int:
        """Move every session off a draining edge; return how many moved. A session that
        cannot move now (closed or moved meanwhile, no edge to take it, none confirmed) is
        logged and skipped: the rest still move, and the edge's placed count shows it."""
        moved = 0
        for sid in [s.session_id for s in self.sessions_on(edge_id)]:
            try:
                _, did = await self.relocate(sid, "drain")
                moved += int(did)
            except NoEdgeAvailable:
                log.error("nowhere to drain session to", extra={"session": sid, "from": edge_id})
            except MoveNotConfirmed:
                pass  # logged with what was tried; the session stays and serves
            except FailedPrecondition as e:
                log.info(
                    "session not drained: it changed meanwhile",
                    extra={"session": sid, "from": edge_id, "detail": e.message},
                )
        return moved

    def _ack(self, edge_id: str, session_id: str, what: str) -> None:
        w = self._waiters.get((edge_id, session_id, what))
        if w is not None:
            w.set()

    def _share_acks(self, edge_id: str, stream: object, now: set[tuple[str, str]]) -> None:
        """Tell other replicas of acknowledgements that appeared in this edge's reports
        since the last one on this stream (whoever waits may be another replica)."""
        last_stream, before = self._acked.get(edge_id, (None, set()))
        fresh = now - before if last_stream is stream else now
        self._acked[edge_id] = (stream, now)
        for sid, what in fresh:
            task = asyncio.create_task(
                self._bus.publish({"kind": "ack", "edge": edge_id, "session_id": sid, "what": what})
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _waiter(self, edge_id: str, session_id: str, kind: str) -> asyncio.Event:
        return self._waiters.setdefault((edge_id, session_id, kind), asyncio.Event())

    async def _expect(self, edge_id: str, session_id: str, kind: str) -> asyncio.Event:
        """A waiter for an acknowledgement from an edge. When another replica may hold the
        edge's stream it is asked to pass the next one on (sent before any command that
        leads to it: the bus keeps one sender's events in order)."""
        w = self._waiter(edge_id, session_id, kind)
        if self._bus.shared and not self._registry.holds(edge_id):
            await self._bus.publish(
                {"kind": "expect", "edge": edge_id, "session_id": session_id, "what": kind}
            )
        return w

    async def _on_edge_connected(self, edge_id: str) -> None:
        # Other replicas learn of the edge now, not at their next look at the store.
        await self._bus.publish({"kind": "edge", "edge": edge_id})
        # Sessions whose edge died while no other edge could take them wait on the dead edge
        # (their devices retrying Attach): place them now that there is somewhere to go.
        for sid in [sid for sid, s in self.sessions.items() if self._edge_dead(s.edge_id)]:
            s = self.sessions[sid]
            try:
                await self.move(sid, "edge_dead", from_edge=s.edge_id)
            except (NoEdgeAvailable, FailedPrecondition):
                continue  # not placeable there (zone table, capacity), or closed meanwhile

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

    async def apply_heartbeat(
        self, edge_id: str, stream: object, reports: list[tuple[str, LiveReport]]
    ) -> None:
        """An edge's report of every session it holds, on its heartbeat stream `stream`."""
        acked: set[tuple[str, str]] = set()
        for sid, report in reports:
            if report.assigned:
                self._ack(edge_id, sid, "assigned")
                acked.add((sid, "assigned"))
            if report.publishers:
                self._ack(edge_id, sid, "publisher")
                acked.add((sid, "publisher"))
            self._apply_live(edge_id, sid, report)
        if self._bus.shared:
            self._share_acks(edge_id, stream, acked)
        await self.reconcile(edge_id, [sid for sid, _ in reports])

    def _apply_live(self, edge_id: str, session_id: str, report: LiveReport) -> None:
        s = self.sessions.get(session_id)
        if s is None or s.edge_id != edge_id:
            return  # not (or no longer) placed there: reconcile() deals with it
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
            h = self._handovers.get(sid)
            if h is not None:
                if now >= h.deadline:
                    del self._handovers[sid]  # its mover is gone (a replica that stopped)
                elif edge_id in (h.old_edge, h.new_edge):
                    continue  # both ends of a make-before-break move hold it until released
            key = (edge_id, sid)
            if now - self._reconciled.get(key, -math.inf) < RELEASE_RESEND_S:
                continue
            # The cache may lag another replica's move: the store decides.
            stored = await self._store.get_session(sid) if len(sid) <= MAX_ID_LEN else None
            if stored is not None and stored.state is SessionState.OPEN:
                if stored.edge_id == edge_id:
                    continue
                release = ReleaseSession(
                    sid, "moved", stored.edge_id, self._address(stored.edge_id)
                )
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
            # Open caches a session before it announces it: one opened just as this watch
            # began is in the snapshot already, and its OPENED would tell it twice.
            in_snapshot = {s.session_id for s in snapshot}
            while True:
                ev = await w.queue.get()
                if ev is None:
                    raise WatcherFellBehind(
                        f"watch fell more than {WATCH_QUEUE} events behind; watch again for a "
                        "fresh snapshot"
                    )
                if ev.kind is EventKind.OPENED and ev.session.session_id in in_snapshot:
                    in_snapshot.discard(ev.session.session_id)
                    continue
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
        e = self._registry.edges.get(s.edge_id)
        return Assignment(
            session_id=s.session_id,
            edge_id=s.edge_id,
            edge_address="" if e is None else e.address,
            token=token,
            expires_unix_ns=exp,
            role=role,
            edge_tls_server_name="" if e is None else e.tls_server_name,
        )

    async def _assign_on_edge(self, s: Session) -> None:
        await self._command(s.edge_id, await self.assignment_command(s))

    async def assignment_command(self, s: Session) -> AssignSession:
        archived = await self.archive.archived_seq(s.session_id) if self.archive else 0
        return AssignSession(s, archived)
