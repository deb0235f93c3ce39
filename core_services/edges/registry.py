"""The edge registry: who is alive, where, how loaded; commands queued to each edge's stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core_services.edges.discovery import DiscoveredEdge
from core_services.sessions.domain import (
    EdgeState,
    EdgeView,
    Placement,
    PlacementIndex,
    Session,
    ZoneLatency,
)
from core_services.store import SqlStore
from telehealth.errors import NotFound
from telehealth.rpc import secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.telemetry.metrics import CoreMetrics

log = logging.getLogger(__name__)

# How often a replica records heartbeat times in a shared store.
HEARTBEAT_FLUSH_S = 1.0


@dataclass(frozen=True)
class AssignSession:
    session: Session
    # Where the session's archive stands: a new edge resumes the watermark from here.
    archived_seq: int = 0


@dataclass(frozen=True)
class ReleaseSession:
    session_id: str
    reason: str
    new_edge_id: str = ""
    new_edge_address: str = ""


@dataclass(frozen=True)
class MoveSession:
    """The session is moving off this edge make-before-break: warn its publisher and viewers,
    keep serving them until ReleaseSession follows."""

    session_id: str
    new_edge_id: str
    reason: str


@dataclass(frozen=True)
class SetDraining:
    draining: bool


@dataclass(frozen=True)
class PushTokenKeys:
    """The core rotated its signing keys: the edge replaces its verifying keys at once."""


@dataclass(frozen=True)
class EndStream:
    """Not sent to the edge: the core gave up on this stream (it declared the edge dead), so
    the stream ends and the edge registers anew, learning what it no longer holds."""

    reason: str


Command = AssignSession | ReleaseSession | MoveSession | SetDraining | PushTokenKeys | EndStream


@dataclass
class EdgeEntry:
    edge_id: str
    zone: str
    address: str
    state: EdgeState = EdgeState.HEALTHY
    capacity_sessions: int = 1000
    reported_sessions: int = 0
    subscribers: int = 0
    cpu_percent: float = 0.0
    batches_in_total: int = 0
    last_heartbeat_mono: float = 0.0
    last_heartbeat_unix_ns: int = 0
    draining: bool = False
    outbox: asyncio.Queue[Command] | None = None
    stream_token: object = field(default_factory=object)
    # Base URL of the edge's HTTP side (patient page, browser signalling), from heartbeats.
    http_address: str = ""
    # Name its server certificate carries, when clients dial `address` by IP ("": the host).
    tls_server_name: str = ""


class EdgeRegistry:
    def __init__(
        self,
        store: SqlStore,
        metrics: CoreMetrics,
        heartbeat_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._clock = clock
        self.edges: dict[str, EdgeEntry] = {}
        # Sessions the core has placed per edge: fresher than the edge's own report. Changed
        # only through add_placed(), which keeps the placement index and gauges in step.
        self.placed: dict[str, int] = {}
        self.placement = PlacementIndex()
        # Open sessions per zone of their edge, and the zone each edge's count is under.
        self._zone_open: dict[str, int] = {}
        self._counted_in: dict[str, str] = {}
        self.on_edge_dead: Callable[[str], Awaitable[None]] | None = None
        # Several core replicas share the store: other replicas' edges come from it.
        self.shared = False
        # The core's own client credentials, for probing edges over mTLS.
        self.tls: TlsFiles | None = None
        self._beats: dict[str, int] = {}
        self._last_flush = 0.0
        self.on_edge_connected: Callable[[str], Awaitable[None]] | None = None
        # Edges Kubernetes last called ready; None until discovery has reported (or without it).
        self.discovered_ready: set[str] | None = None
        # Pod addresses from discovery (edge id -> host:port): what the core itself dials.
        self.discovered_addresses: dict[str, str] = {}
        # No edge is judged before the core serves; then each has until these times plus
        # the timeout to be heard (set by start_liveness).
        self._grace_until_mono: float | None = None
        self._grace_until_ns = 0

    async def load(self) -> None:
        """Recover edges from the store after a core restart; their liveness clocks start
        only when the core serves (start_liveness)."""
        now = self._clock()
        for row in await self._store.list_edges():
            state = row["state"]
            self.edges[row["edge_id"]] = EdgeEntry(
                edge_id=row["edge_id"],
                zone=row["zone"],
                address=row["address"],
                state=state,
                capacity_sessions=row["capacity_sessions"],
                last_heartbeat_mono=now,
                last_heartbeat_unix_ns=row["last_heartbeat_unix_ns"],
                draining=state is EdgeState.DRAINING,
                tls_server_name=row["tls_server_name"],
            )
            self._changed(self.edges[row["edge_id"]])
        self._export()

    def _view(self, e: EdgeEntry) -> EdgeView:
        return EdgeView(
            edge_id=e.edge_id,
            zone=e.zone,
            address=e.address,
            state=e.state,
            active_sessions=max(self.placed.get(e.edge_id, 0), e.reported_sessions)
            if e.state is not EdgeState.DEAD
            else 0,
            capacity_sessions=e.capacity_sessions,
        )

    def views(self) -> list[EdgeView]:
        return [self._view(e) for e in self.edges.values()]

    def choose(
        self, zone: str, latency: ZoneLatency, exclude: frozenset[str] = frozenset()
    ) -> Placement:
        """Placement over the index: the same answer as choose_edge(views()), without
        looking at every edge."""
        return self.placement.choose(zone, latency, exclude)

    def _changed(self, e: EdgeEntry) -> None:
        """An edge's state, zone, capacity or load may have changed: re-index it if so and
        recount its zone's open sessions."""
        view = self._view(e)
        if self.placement.get(e.edge_id) != view:
            self.placement.update(view)
        counted = self._counted_in.get(e.edge_id)
        if counted != e.zone:
            n = self.placed.get(e.edge_id, 0)
            if counted is not None:
                self._add_zone_open(counted, -n)
            self._counted_in[e.edge_id] = e.zone
            self._add_zone_open(e.zone, n)

    def _add_zone_open(self, zone: str, n: int) -> None:
        total = self._zone_open.get(zone, 0) + n
        self._zone_open[zone] = total
        self._metrics.open_sessions.labels(zone).set(total)

    def add_placed(self, edge_id: str, delta: int) -> None:
        """The directory placed (+1) or took away (-1) a session on this edge."""
        n = max(0, self.placed.get(edge_id, 0) + delta)
        delta = n - self.placed.get(edge_id, 0)
        self.placed[edge_id] = n
        e = self.edges.get(edge_id)
        if e is None:
            return  # counted in its zone when the edge becomes known
        zone = self._counted_in.get(edge_id)
        if zone is None:
            self._changed(e)  # counts the whole of placed in
        else:
            self._add_zone_open(zone, delta)
            if max(n, e.reported_sessions) != max(n - delta, e.reported_sessions):
                self.placement.update(self._view(e))
        self._metrics.edge_load.labels(e.edge_id, e.zone).set(
            max(n, e.reported_sessions) / max(e.capacity_sessions, 1)
        )

    def get(self, edge_id: str) -> EdgeEntry:
        e = self.edges.get(edge_id)
        if e is None:
            raise NotFound(f"no edge named {edge_id!r}; known: {sorted(self.edges) or 'none'}")
        return e

    async def connect(
        self, edge_id: str, zone: str, address: str, capacity: int, tls_server_name: str = ""
    ) -> tuple[EdgeEntry, asyncio.Queue[Command]]:
        """A heartbeat stream opened: (re)register the edge and give it a fresh outbox."""
        e = self.edges.get(edge_id)
        was_dead = e is None or e.state is EdgeState.DEAD
        if e is None:
            e = EdgeEntry(edge_id=edge_id, zone=zone, address=address)
            self.edges[edge_id] = e
        e.zone, e.address, e.capacity_sessions = zone, address, capacity
        e.tls_server_name = tls_server_name
        if e.outbox is not None:
            # An older stream of this edge is still open here: it must not outlive this one.
            e.outbox.put_nowait(EndStream("the edge opened a newer heartbeat stream"))
        e.outbox = asyncio.Queue()
        e.stream_token = object()
        e.last_heartbeat_mono = self._clock()
        e.last_heartbeat_unix_ns = time.time_ns()
        # Heartbeats on a new stream revive a dead edge, unless Kubernetes says it is not ready.
        e.state = self._alive_state(e) if self._may_serve(edge_id) else EdgeState.DEAD
        self._changed(e)
        log.info(
            "edge connected",
            extra={
                "edge": edge_id,
                "zone": zone,
                "address": address,
                "was_dead": was_dead,
                "state": e.state.name.lower(),
            },
        )
        await self._persist(e)
        self._export()
        if self.on_edge_connected is not None:
            await self.on_edge_connected(edge_id)
        return e, e.outbox

    @staticmethod
    def _alive_state(e: EdgeEntry) -> EdgeState:
        return EdgeState.DRAINING if e.draining else EdgeState.HEALTHY

    def _may_serve(self, edge_id: str) -> bool:
        return self.discovered_ready is None or edge_id in self.discovered_ready

    def holds(self, edge_id: str) -> bool:
        """Does this replica hold the edge's heartbeat stream?"""
        e = self.edges.get(edge_id)
        return e is not None and e.outbox is not None

    def is_current(self, edge_id: str, stream_token: object) -> bool:
        """Is this the edge's live stream here (not one the core ended or a newer one replaced)?"""
        e = self.edges.get(edge_id)
        return e is not None and e.stream_token is stream_token and e.outbox is not None

    def disconnect(self, edge_id: str, stream_token: object) -> None:
        e = self.edges.get(edge_id)
        # A newer stream of the same edge may already have replaced this one.
        if e is not None and e.stream_token is stream_token:
            e.outbox = None

    def heartbeat(
        self,
        edge_id: str,
        *,
        active_sessions: int,
        subscribers: int,
        capacity: int,
        cpu_percent: float,
        batches_in_total: int,
    ) -> None:
        e = self.edges[edge_id]
        capacity = capacity or e.capacity_sessions
        if (e.reported_sessions, e.capacity_sessions) != (active_sessions, capacity):
            e.reported_sessions, e.capacity_sessions = active_sessions, capacity
            self.placement.update(self._view(e))
        e.subscribers = subscribers
        e.cpu_percent = cpu_percent
        e.batches_in_total = batches_in_total
        e.last_heartbeat_mono = self._clock()
        e.last_heartbeat_unix_ns = time.time_ns()
        self._beats[edge_id] = e.last_heartbeat_unix_ns
        self._metrics.heartbeats.inc()
        self._metrics.edge_load.labels(e.edge_id, e.zone).set(
            max(self.placed.get(edge_id, 0), active_sessions) / max(e.capacity_sessions, 1)
        )

    def send(self, edge_id: str, command: Command) -> bool:
        e = self.edges.get(edge_id)
        if e is None or e.outbox is None:
            return False
        e.outbox.put_nowait(command)
        return True

    def broadcast(self, command: Command) -> None:
        for edge_id in self.edges:
            self.send(edge_id, command)

    async def set_draining(self, edge_id: str, draining: bool) -> EdgeEntry:
        e = self.get(edge_id)
        e.draining = draining
        self.send(edge_id, SetDraining(draining))
        if e.state is not EdgeState.DEAD:
            e.state = EdgeState.DRAINING if draining else EdgeState.HEALTHY
        self._changed(e)
        await self._persist(e)
        self._export()
        return e

    async def probe(self, edge_id: str, timeout_s: float = 0.3) -> bool:
        """Is the edge alive right now? Its heartbeat stream must be up and its health
        check must answer SERVING within the timeout."""
        e = self.edges.get(edge_id)
        if e is None or e.state is EdgeState.DEAD:
            return False
        if e.outbox is None and not self.shared:
            return False  # its heartbeat stream to this (only) core is gone
        # The address an edge advertises is for devices (in kind, a node port on the host) and
        # may not be reachable from the core's pod; discovery knows the pod's own address.
        address = self.discovered_addresses.get(edge_id) or e.address
        try:
            async with secure_channel(address, self.tls, server_name=e.tls_server_name) as ch:
                r = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s
                )
        except grpc.aio.AioRpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    def start_liveness(self, grace_s: float) -> None:
        """The core serves from now. An edge not heard from since (its stream was to the core
        before a restart) has the heartbeat timeout plus `grace_s` - its longest reconnect
        backoff - to come back before it is declared dead and its live sessions re-placed."""
        self._grace_until_mono = self._clock() + grace_s
        self._grace_until_ns = time.time_ns() + int(grace_s * 1e9)

    def _late(self, e: EdgeEntry, now: float, now_ns: int) -> bool:
        assert self._grace_until_mono is not None
        if e.outbox is None and self.shared:
            # Another replica may hold this edge's stream: judge by the shared store.
            last_ns = max(e.last_heartbeat_unix_ns, self._grace_until_ns)
            return now_ns - last_ns > self.heartbeat_timeout_s * 1e9
        last = max(e.last_heartbeat_mono, self._grace_until_mono)
        return now - last > self.heartbeat_timeout_s

    async def check_liveness(self) -> list[str]:
        """Mark edges dead whose heartbeats stopped; return the newly dead."""
        if self._grace_until_mono is None:
            return []  # not serving yet: nobody could have reached us
        if self.shared:
            await self._flush_beats()
            await self.refresh()
        now, now_ns = self._clock(), time.time_ns()
        late = [
            e.edge_id
            for e in self.edges.values()
            if e.state is not EdgeState.DEAD and self._late(e, now, now_ns)
        ]
        return await self.mark_dead(late, f"no heartbeat for {self.heartbeat_timeout_s}s")

    async def _flush_beats(self) -> None:
        # At most once a second: well inside the heartbeat timeout others judge by.
        if self._clock() - self._last_flush < HEARTBEAT_FLUSH_S or not self._beats:
            return
        beats, self._beats = self._beats, {}
        self._last_flush = self._clock()
        await self._store.touch_edges(beats)

    async def refresh(self) -> None:
        """Take in edges whose streams other replicas hold, as the shared store has them."""
        tokens = {e.edge_id: e.stream_token for e in self.edges.values()}
        for row in await self._store.list_edges():
            e = self.edges.get(row["edge_id"])
            if e is not None and e.outbox is not None:
                # This replica hears the edge itself. If another replica declared it dead
                # (and re-placed its sessions) while this stream stayed up, end the stream so
                # the edge registers again and learns what moved - unless the stream is newer
                # than what was read.
                if (
                    row["state"] is EdgeState.DEAD
                    and e.state is not EdgeState.DEAD
                    and tokens.get(e.edge_id) is e.stream_token
                ):
                    log.warning("edge declared dead by another replica", extra={"edge": e.edge_id})
                    e.state = EdgeState.DEAD
                    self._end_stream(e, "declared dead by another core replica")
                    self._changed(e)
                continue
            if e is None:
                e = EdgeEntry(edge_id=row["edge_id"], zone=row["zone"], address=row["address"])
                self.edges[e.edge_id] = e
            e.zone, e.address = row["zone"], row["address"]
            e.tls_server_name = row["tls_server_name"]
            e.state = row["state"]
            e.draining = e.state is EdgeState.DRAINING
            e.capacity_sessions = row["capacity_sessions"]
            e.last_heartbeat_unix_ns = max(e.last_heartbeat_unix_ns, row["last_heartbeat_unix_ns"])
            self._changed(e)
        self._export()

    async def apply_discovery(self, found: list[DiscoveredEdge]) -> list[str]:
        """Kubernetes' view: an edge whose endpoint is gone or not ready is dead at once,
        without waiting for its heartbeats to time out; one that is ready again and
        heartbeating here comes back. Returns the newly dead."""
        ready = {d.edge_id for d in found if d.ready}
        self.discovered_ready = ready
        self.discovered_addresses = {d.edge_id: d.address for d in found if d.address}
        now = self._clock()
        for e in self.edges.values():
            if (
                e.state is EdgeState.DEAD
                and e.edge_id in ready
                and e.outbox is not None
                and now - e.last_heartbeat_mono <= self.heartbeat_timeout_s
            ):
                await self._revive(e, "endpoint ready again in Kubernetes")
        gone = [
            e.edge_id
            for e in self.edges.values()
            if e.state is not EdgeState.DEAD and e.edge_id not in ready
        ]
        return await self.mark_dead(gone, "endpoint removed or not ready in Kubernetes")

    async def _revive(self, e: EdgeEntry, reason: str) -> None:
        e.state = self._alive_state(e)
        self._changed(e)
        log.info("edge back", extra={"edge": e.edge_id, "reason": reason})
        await self._persist(e)
        self._export()
        if self.on_edge_connected is not None:
            await self.on_edge_connected(e.edge_id)

    async def mark_dead(self, edge_ids: list[str], reason: str) -> list[str]:
        # Several clients may report the same edge at once: only the first report counts.
        edge_ids = [i for i in edge_ids if self.edges[i].state is not EdgeState.DEAD]
        for edge_id in edge_ids:
            self.edges[edge_id].state = EdgeState.DEAD
            self._changed(self.edges[edge_id])
        claimed = []
        for edge_id in edge_ids:
            e = self.edges[edge_id]
            e.state = EdgeState.DEAD
            self._end_stream(e, reason)
            if self.shared and not await self._store.claim_edge_death(edge_id):
                continue  # another replica saw it first and re-places its sessions
            claimed.append(edge_id)
            log.warning("edge marked dead", extra={"edge": edge_id, "reason": reason})
            await self._persist(e)
        edge_ids = claimed
        if edge_ids:
            self._export()
            if self.on_edge_dead is not None:
                for edge_id in edge_ids:
                    await self.on_edge_dead(edge_id)
        return edge_ids

    def _end_stream(self, e: EdgeEntry, reason: str) -> None:
        """End the edge's heartbeat stream here: when (if) the edge is alive it registers
        again, reports what it holds, and is told which of those sessions moved on."""
        if e.outbox is not None:
            e.outbox.put_nowait(EndStream(f"edge {e.edge_id} declared dead: {reason}"))
        e.outbox = None
        e.stream_token = object()

    async def run_liveness(self, stop: asyncio.Event) -> None:
        period = min(0.25, self.heartbeat_timeout_s / 4)
        while not stop.is_set():
            try:
                await self.check_liveness()
            except Exception:
                log.exception("liveness check failed")
            try:
                await asyncio.wait_for(stop.wait(), period)
            except TimeoutError:
                pass

    async def _persist(self, e: EdgeEntry) -> None:
        await self._store.upsert_edge(
            edge_id=e.edge_id,
            zone=e.zone,
            address=e.address,
            state=e.state,
            capacity_sessions=e.capacity_sessions,
            last_heartbeat_unix_ns=e.last_heartbeat_unix_ns,
            tls_server_name=e.tls_server_name,
        )

    def _export(self) -> None:
        for state in EdgeState:
            self._metrics.edges.labels(state.name.lower()).set(
                sum(1 for e in self.edges.values() if e.state is state)
            )
