"""A clinician's view of one session that follows it: through moves, edge loss and token expiry,
every batch once and in seq order, with what the edge cannot replay filled from the archive.

    async with grpc.aio.insecure_channel(core_address) as core:
        viewer = SessionViewer(core, session_id, metadata=bearer(login_token))
        async for ev in viewer:               # runs until the caller stops iterating
            if isinstance(ev, VitalsEvent):   # a batch, NEWS2, ECG heart rate or alert
                ...
            elif isinstance(ev, Following):   # subscribed (again) on ev.edge_id
                ...
            elif isinstance(ev, Interrupted): # not live now; retrying in ev.retry_in_s
                ...
            elif isinstance(ev, Missing):     # seqs neither the edge nor the archive had
                ...

Guarantees: VitalsEvent batches (other than the seq-0 snapshot of the latest readings a new
subscription starts with, VitalsEvent.snapshot) come with strictly increasing seq, never twice (whether
from the live stream, an edge's replay or the archive); seqs the edge reports as missed are
fetched from ArchiveService.QueryVitals before any later batch is shown, waiting up to
fill_timeout_s for the archive to catch up; what is still absent then is reported as Missing
rather than shown late. Statuses a retry can fix (core or edge unreachable, moves, expired
stream tokens, the viewer cap) never end the iteration; ones it cannot (not logged in, not
this patient's clinician, no such session, session closed) raise grpc.aio.AioRpcError.
`viewer.stats` counts follows, fills and duplicates for tests and the UI.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from clients.dial import edge_channel
from telehealth.rpc import bearer, jittered
from telehealth.security.tls import TlsFiles
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)

log = logging.getLogger("viewer")

Event = vitals_pb2.SubscribeVitalsResponse
# Core refusals no retry fixes: the person must log in, be assigned, or pick another session.
FATAL_CORE_CODES = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}
# Losing the edge with these means it (or the way to it) may be gone: the core is told.
EDGE_GONE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
REFRESH_AT_FRACTION = 2 / 3  # re-subscribe with a fresh token before its lifetime ends
QUERY_PAGE = 1000
INBOX = 1024  # events buffered from the edge; past it gRPC flow control holds the edge back


@dataclass(frozen=True)
class VitalsEvent:
    """An edge event to show: batch, news2, derived_heart_rate or alert. Batches come in
    seq order, each once; from_archive when it was filled in from the archive."""

    event: Event
    from_archive: bool = False

    @property
    def snapshot(self) -> bool:
        """A batch with seq 0: the edge's latest readings sent to a new view (include_latest),
        each field at its own device time; not a published batch."""
        return self.event.HasField("batch") and self.event.batch.seq == 0


@dataclass(frozen=True)
class Following:
    """Subscribed on edge_id, resuming after resume_after_seq. reason: start, moving (the
    session moves make-before-break), lost (the stream broke), expiry (fresh token)."""

    edge_id: str
    reason: str
    resume_after_seq: int


@dataclass(frozen=True)
class Interrupted:
    """The view is not live: message says why; the next try is in retry_in_s."""

    message: str
    code: str
    retry_in_s: float


@dataclass(frozen=True)
class Missing:
    """Batches first_seq..last_seq (inclusive) that neither the edge nor the archive gave."""

    first_seq: int
    last_seq: int
    reason: str


ViewerEvent = VitalsEvent | Following | Interrupted | Missing


@dataclass
class ViewerStats:
    subscriptions: int = 0
    # Follows of a move announced by the edge, done before the old stream was dropped.
    moves_followed: int = 0
    # Streams lost and subscribed again (edge gone, released, expired token ...).
    resubscribes: int = 0
    token_refreshes: int = 0
    core_failures: int = 0
    duplicates_dropped: int = 0
    filled_from_archive: int = 0
    missing: int = 0
    # Events the edge dropped because this view fell behind (its SubscriptionGap counts).
    dropped_by_edge: int = 0
    edges: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Sub:
    """One Subscribe call to one edge, read by a task of its own into the viewer's inbox."""

    assignment: sessions_pb2.Assignment
    channel: grpc.aio.Channel
    reason: str
    resume_after_seq: int
    received_at_ns: int
    task: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def edge_id(self) -> str:
        return self.assignment.edge_id


@dataclass(frozen=True)
class _End:
    error: grpc.aio.AioRpcError | None


class SessionViewer:
    """Follows one session as a clinician's client; iterate it for ViewerEvents.

    core: a channel to the core (its interceptors or `metadata` carry the login token).
    tls: the client certificate for dialling edges (None: plaintext).
    include_latest: start with the NEWS2 and alerts the edge already knows.
    resume_after_seq: start after this seq (0: live only).
    fill_timeout_s: how long a gap waits for the archive before it is reported Missing.
    """

    def __init__(
        self,
        core: grpc.aio.Channel,
        session_id: str,
        *,
        tls: TlsFiles | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        include_latest: bool = True,
        resume_after_seq: int = 0,
        fill_timeout_s: float = 5.0,
        backoff_cap_s: float = 5.0,
    ) -> None:
        self.session_id = session_id
        self._sessions = sessions_pb2_grpc.SessionsServiceStub(core)
        self._archive = archive_pb2_grpc.ArchiveServiceStub(core)
        self._tls = tls
        self._metadata = tuple(metadata) if metadata else None
        self._include_latest = include_latest
        self.fill_timeout_s = fill_timeout_s
        self._backoff_cap_s = backoff_cap_s
        self.stats = ViewerStats()
        # Highest batch seq shown, and its device time (where an archive query starts).
        self.last_seq = resume_after_seq
        self._last_device_ns = 0
        self.edge_id = ""
        self._inbox: asyncio.Queue[tuple[_Sub, Event | _End]] = asyncio.Queue(INBOX)
        self._subs: set[_Sub] = set()
        # After a new subscription or an edge-side drop, a seq jump means batches to fetch;
        # otherwise it is a seq the edge refused, which never comes.
        self._check_seam = False
        self._news2_key: tuple[int, int] = (0, 0)
        self._derived_key: tuple[int, int] = (0, 0)
        self._alerts_seen: deque[tuple[int, int, str]] = deque(maxlen=64)

    def __aiter__(self) -> AsyncIterator[ViewerEvent]:
        return self.events()

    # -- the core -------------------------------------------------------------------------

    async def _attach(self, unreachable: str = "") -> sessions_pb2.Assignment:
        resp = await self._sessions.Attach(
            sessions_pb2.AttachSessionRequest(
                session_id=self.session_id,
                role=sessions_pb2.ROLE_VIEWER,
                unreachable_edge_id=unreachable,
            ),
            metadata=self._metadata,
            timeout=5,
        )
        return resp.assignment

    @staticmethod
    def _fatal(e: grpc.aio.AioRpcError) -> bool:
        if e.code() in FATAL_CORE_CODES:
            return True
        return e.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in (e.details() or "")

    # -- subscriptions ----------------------------------------------------------------------

    def _subscribe(self, a: sessions_pb2.Assignment, reason: str) -> _Sub:
        sub = _Sub(a, edge_channel(a, self._tls), reason, self.last_seq, time.time_ns())
        self._subs.add(sub)
        sub.task = asyncio.create_task(self._read(sub))
        self.stats.subscriptions += 1
        return sub

    async def _read(self, sub: _Sub) -> None:
        call = vitals_pb2_grpc.VitalsServiceStub(sub.channel).Subscribe(
            vitals_pb2.SubscribeVitalsRequest(
                session_id=self.session_id,
                include_latest=self._include_latest,
                resume_after_seq=sub.resume_after_seq,
            ),
            metadata=bearer(sub.assignment.token),
        )
        try:
            while True:
                ev = await call.read()
                if not isinstance(ev, Event):
                    break  # grpc.aio.EOF
                await self._inbox.put((sub, ev))
            await self._inbox.put((sub, _End(None)))
        except grpc.aio.AioRpcError as e:
            await self._inbox.put((sub, _End(e)))
        finally:
            call.cancel()

    async def _close(self, sub: _Sub | None) -> None:
        if sub is None or sub.closed:
            return
        sub.closed = True
        self._subs.discard(sub)
        if sub.task is not None:
            sub.task.cancel()
            await asyncio.gather(sub.task, return_exceptions=True)
        await sub.channel.close()

    def _refresh_due(self, sub: _Sub) -> float:
        exp = sub.assignment.token_expires_unix_ns
        if not exp:
            return float("inf")
        due_ns = sub.received_at_ns + (exp - sub.received_at_ns) * REFRESH_AT_FRACTION
        return time.monotonic() + max(0.0, (due_ns - time.time_ns()) / 1e9)

    # -- the loop ---------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[ViewerEvent, None]:
        """ViewerEvents until the caller stops iterating (or a fatal refusal raises)."""
        active: _Sub | None = None
        # A subscription opened beside the active one (move, token refresh): it takes over
        # with its first event, so the view never goes dark during a planned switch.
        pending: _Sub | None = None
        pending_reason = ""
        reason, unreachable = "start", ""
        backoff = 0.1
        switch_at = float("inf")  # when to try opening `pending` (again)

        def take_over(new: _Sub) -> Following:
            nonlocal active, pending, pending_reason, backoff, switch_at
            active, pending = new, None
            self._check_seam = True
            self.edge_id = new.edge_id
            if new.reason == "moving":
                self.stats.moves_followed += 1
                self.stats.edges.append(new.edge_id)
            else:
                self.stats.token_refreshes += 1
            pending_reason, backoff = "", 0.1
            switch_at = self._refresh_due(new)
            return Following(new.edge_id, new.reason, new.resume_after_seq)

        try:
            while True:
                if active is None:
                    try:
                        a = await self._attach(unreachable)
                    except grpc.aio.AioRpcError as e:
                        if self._fatal(e):
                            raise
                        self.stats.core_failures += 1
                        delay = jittered(backoff)
                        backoff = min(backoff * 2, self._backoff_cap_s)
                        yield Interrupted(
                            f"core unreachable ({e.code().name}: {e.details()})",
                            e.code().name,
                            delay,
                        )
                        await asyncio.sleep(delay)
                        continue
                    unreachable = ""
                    active = self._subscribe(a, reason)
                    self._check_seam = True
                    self.edge_id = a.edge_id
                    self.stats.edges.append(a.edge_id)
                    if reason == "moving":
                        self.stats.moves_followed += 1
                    switch_at = self._refresh_due(active)
                    yield Following(a.edge_id, reason, self.last_seq)
                now = time.monotonic()
                timeout = None if switch_at == float("inf") else max(0.0, switch_at - now)
                try:
                    sub, item = await asyncio.wait_for(self._inbox.get(), timeout)
                except TimeoutError:
                    # Time to open a subscription beside the active one: token refresh or a
                    # move whose new edge the core had not named yet.
                    switch_at = float("inf")
                    if pending is None:
                        why = pending_reason or "expiry"
                        try:
                            a = await self._attach()
                        except grpc.aio.AioRpcError as e:
                            if self._fatal(e):
                                raise
                            self.stats.core_failures += 1
                            switch_at = time.monotonic() + min(backoff, 2.0)
                            backoff = min(backoff * 2, self._backoff_cap_s)
                            continue
                        if why == "moving" and a.edge_id == active.edge_id:
                            switch_at = time.monotonic() + 0.2  # core not switched yet
                            continue
                        pending = self._subscribe(a, why)
                    continue
                if sub is pending:
                    if isinstance(item, _End):
                        log.info(
                            "new subscription failed; staying on the old one",
                            extra={"session": self.session_id, "edge": sub.edge_id},
                        )
                        await self._close(pending)
                        pending = None
                        switch_at = time.monotonic() + min(backoff, 2.0)
                        backoff = min(backoff * 2, self._backoff_cap_s)
                        continue
                    # The new subscription delivers: drop the old one and go on with it.
                    await self._close(active)
                    yield take_over(sub)
                elif sub is not active:
                    continue  # a closed subscription's last words
                if isinstance(item, _End):
                    assert active is not None
                    lost = active
                    await self._close(active)
                    active = None
                    if pending is not None:
                        # The old edge let go first; the new subscription is already open.
                        yield take_over(pending)
                        continue
                    if pending_reason == "moving":
                        # Released before the core named the new edge to us: attach now.
                        reason, pending_reason = "moving", ""
                        switch_at = float("inf")
                        continue
                    self.stats.resubscribes += 1
                    err = item.error
                    code = err.code() if err is not None else grpc.StatusCode.UNAVAILABLE
                    if err is not None and code in EDGE_GONE_CODES:
                        unreachable = lost.edge_id  # ask the core to check that edge now
                    reason = "lost"
                    detail = err.details() if err is not None else "stream ended"
                    delay = 0.0 if backoff <= 0.1 else jittered(backoff)
                    yield Interrupted(
                        f"lost edge {lost.edge_id} ({code.name}: {detail}); following",
                        code.name,
                        delay,
                    )
                    backoff = min(backoff * 2, self._backoff_cap_s)
                    if delay:
                        await asyncio.sleep(delay)
                    continue
                ev = item
                kind = ev.WhichOneof("event")
                if kind == "moving":
                    if pending is None and pending_reason != "moving":
                        pending_reason = "moving"
                        switch_at = time.monotonic()  # open the new subscription now
                    continue
                backoff = 0.1
                async for out in self._deliver(ev):
                    yield out
        finally:
            await self._close(pending)
            await self._close(active)
            for s in list(self._subs):
                await self._close(s)

    async def _deliver(self, ev: Event) -> AsyncIterator[ViewerEvent]:
        kind = ev.WhichOneof("event")
        if kind == "batch":
            seq = ev.batch.seq
            if seq == 0:
                yield VitalsEvent(ev)  # the latest readings (include_latest), not a batch
                return
            if seq <= self.last_seq:
                self.stats.duplicates_dropped += 1
                return
            if self._check_seam and self.last_seq and seq > self.last_seq + 1:
                async for out in self._fill(
                    self.last_seq + 1, seq - 1, ev.batch.device_time_unix_ns
                ):
                    yield out
            self._check_seam = False
            self.last_seq = seq
            self._last_device_ns = ev.batch.device_time_unix_ns
            yield VitalsEvent(ev)
        elif kind == "gap":
            g = ev.gap
            self.stats.dropped_by_edge += g.dropped_events
            if g.first_missing_seq and g.last_missing_seq >= g.first_missing_seq:
                first = max(g.first_missing_seq, self.last_seq + 1)
                async for out in self._fill(first, g.last_missing_seq, 0):
                    yield out
            else:
                self._check_seam = True  # the next batch shows what was dropped
            yield VitalsEvent(ev)
        elif kind == "news2":
            key = (ev.news2.seq, ev.news2.computed_unix_ns)
            if key <= self._news2_key:
                return  # a replay of what was shown, or older
            self._news2_key = key
            yield VitalsEvent(ev)
        elif kind == "derived_heart_rate":
            key = (ev.derived_heart_rate.seq, ev.derived_heart_rate.computed_unix_ns)
            if key <= self._derived_key:
                return
            self._derived_key = key
            yield VitalsEvent(ev)
        elif kind == "alert":
            akey = (ev.alert.seq, int(ev.alert.kind), ev.alert.message)
            if akey in self._alerts_seen:
                return
            self._alerts_seen.append(akey)
            yield VitalsEvent(ev)

    async def _fill(
        self, first: int, last: int, before_device_ns: int
    ) -> AsyncIterator[ViewerEvent]:
        """Batches first..last from the archive, in order. Waits (up to fill_timeout_s) until
        the archive's watermark passes `last`: then whatever it lacks was refused at the edge
        (a tombstone, never shown); still short at the deadline is reported as Missing."""
        if last < first:
            return
        deadline = time.monotonic() + self.fill_timeout_s
        got: dict[int, archive_pb2.ArchivedBatch] = {}
        complete = False
        while True:
            try:
                wm = await self._archive.GetWatermark(
                    archive_pb2.GetWatermarkRequest(session_id=self.session_id),
                    metadata=self._metadata,
                    timeout=5,
                )
                archived = wm.watermark.archived_seq
                await self._query(first, last, before_device_ns, got)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise
                self.stats.core_failures += 1
                archived = 0
            if len(got) == last - first + 1 or archived >= last:
                complete = True
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        for seq in sorted(got):
            row = got[seq]
            self.stats.filled_from_archive += 1
            self.last_seq = seq
            self._last_device_ns = row.batch.device_time_unix_ns
            yield VitalsEvent(
                Event(
                    session_id=self.session_id,
                    edge_received_unix_ns=row.edge_received_unix_ns,
                    batch=row.batch,
                ),
                from_archive=True,
            )
        if not complete:
            for lo, hi in _ranges(s for s in range(first, last + 1) if s not in got):
                self.stats.missing += hi - lo + 1
                yield Missing(lo, hi, "not in the archive yet")
        self.last_seq = max(self.last_seq, last)

    async def _query(
        self,
        first: int,
        last: int,
        before_device_ns: int,
        got: dict[int, archive_pb2.ArchivedBatch],
    ) -> None:
        # The archive is searched by device time: from the last batch shown (batches before
        # a gap are older) up to the one after it when known, page by page.
        start = self._last_device_ns
        while True:
            resp = await self._archive.QueryVitals(
                archive_pb2.QueryVitalsRequest(
                    session_id=self.session_id,
                    from_unix_ns=start,
                    to_unix_ns=before_device_ns,
                    limit=QUERY_PAGE,
                ),
                metadata=self._metadata,
                timeout=10,
            )
            beyond = False
            for row in resp.batches:
                seq = row.batch.seq
                if row.rejected:
                    continue
                if first <= seq <= last:
                    got.setdefault(seq, row)
                elif seq > last:
                    beyond = True
            if not resp.truncated or beyond or not resp.batches:
                return
            nxt = resp.batches[-1].batch.device_time_unix_ns
            if nxt <= start:
                return  # a whole page at one device time: nothing more to learn this way
            start = nxt


def _ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending seqs as inclusive (first, last) runs."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
