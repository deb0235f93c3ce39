"""gRPC edge of the vitals pipeline: Publish (device) and Subscribe (clinician)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from edge_nodes.journal import Journal, JournalError
from edge_nodes.vitals.domain import check_refresh
from edge_nodes.vitals.fanout import Subscriber, SubscriberClosed
from edge_nodes.vitals.pipeline import Event, SessionChannel
from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from telehealth.rpc import Context, status_of, token_from
from telehealth.security.tokens import SessionClaims, TokenVerifier
from telehealth.telemetry.metrics import EdgeMetrics
from telehealth.v1 import vitals_pb2, vitals_pb2_grpc

log = logging.getLogger(__name__)

# Journal entries read per step of a resume's replay.
REPLAY_PAGE = 256
TOKEN_EXPIRED = "token expired; attach again for a fresh one"
# At most one plain ack per publish stream this often (received_seq is at most this late).
ACK_INTERVAL_S = 0.02


class _PublishStream:
    """What one publish stream owes its device: the reader fills it in, the response
    generator sends it."""

    def __init__(self) -> None:
        self.woken = asyncio.Event()
        # One bound method, so the channel can hold it in a set and drop it again.
        self.wake = self.woken.set
        self.channel: SessionChannel | None = None
        self.last_seq = 0
        self.ack_due = False
        self.duplicates = 0
        self.rejections: deque[vitals_pb2.BatchRejection] = deque()
        self.moving_sent: vitals_pb2.SessionMoving | None = None
        self.claims: SessionClaims | None = None
        self.expired = False
        self._expiry: asyncio.TimerHandle | None = None

    def expire_at(self, claims: SessionClaims) -> None:
        """End the stream when this token expires (a refresh moves the end later)."""
        self.claims = claims
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(
            loop.time() + max(0.0, claims.expires_unix - time.time()), self._expire
        )

    def _expire(self) -> None:
        self.expired = True
        self.wake()

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()

    def only_ack_due(self) -> bool:
        """Nothing but a cumulative ack to send (no rejection, move, release or expiry)."""
        ch = self.channel
        return (
            ch is not None
            and not self.rejections
            and not self.expired
            and ch.released is None
            and ch.moving is self.moving_sent
        )

    def responses(self) -> list[vitals_pb2.PublishVitalsResponse]:
        ch = self.channel
        if ch is None:
            return []
        out: list[vitals_pb2.PublishVitalsResponse] = []

        def ack() -> vitals_pb2.PublishVitalsResponse:
            # Acks are cumulative: the journaled watermark now covers every batch taken.
            return vitals_pb2.PublishVitalsResponse(
                session_id=ch.session_id,
                received_seq=ch.received.value,
                archived_seq=ch.archived_seq,
            )

        while self.rejections:
            resp = ack()
            resp.rejection.CopyFrom(self.rejections.popleft())
            out.append(resp)
        if self.duplicates or (self.ack_due and not out):
            resp = ack()
            resp.duplicates_dropped = self.duplicates
            out.append(resp)
        self.ack_due, self.duplicates = False, 0
        if ch.moving is not None and ch.moving is not self.moving_sent:
            resp = ack()
            resp.moving.CopyFrom(ch.moving)
            out.append(resp)
            self.moving_sent = ch.moving
        return out


class VitalsServicer(vitals_pb2_grpc.VitalsServiceServicer):
    def __init__(
        self,
        sessions: EdgeSessions,
        verifier: TokenVerifier,
        metrics: EdgeMetrics,
        subscriber_queue: int,
        journal: Journal,
    ) -> None:
        self._journal = journal
        self._sessions = sessions
        self._verifier = verifier
        self._metrics = metrics
        self._subscriber_queue = subscriber_queue

    def _claims(self, context: Context, session_id: str, roles: tuple[str, ...]) -> SessionClaims:
        if not self._verifier.has_keys:
            raise Unavailable("edge has not yet received token keys from the core; retry shortly")
        return self._verifier.verify(
            token_from(context.invocation_metadata()), session_id=session_id, roles=roles
        )

    async def Publish(
        self,
        request_iterator: AsyncIterator[vitals_pb2.PublishVitalsRequest],
        context: Context,
    ) -> AsyncIterator[vitals_pb2.PublishVitalsResponse]:
        """Batches in, acks out. A reader task takes in batches while this generator sends
        what the stream owes the device: one cumulative ack for whatever was journaled since
        the last one (a burst is acked as one, not batch by batch), each rejection, and a
        move or release, which must reach the device even when it sends nothing."""
        st = _PublishStream()
        reader = asyncio.create_task(self._read(request_iterator, context, st))
        reader.add_done_callback(lambda _: st.wake())
        loop = asyncio.get_running_loop()
        acked_at = 0.0
        try:
            while True:
                await st.woken.wait()
                st.woken.clear()
                if st.only_ack_due() and not reader.done():
                    # Acks are cumulative, so during a burst (a backlog resent after a
                    # reconnect) one every ACK_INTERVAL_S covers all the batches taken
                    # meanwhile; a device streaming at 25/s still has each batch acked
                    # at once.
                    wait = acked_at + ACK_INTERVAL_S - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                        st.woken.clear()
                out = st.responses()
                if out:
                    acked_at = loop.time()
                for resp in out:
                    yield resp
                if reader.done():
                    # Acks for what was taken before the stream ended (or failed) go first.
                    while out := st.responses():
                        for resp in out:
                            yield resp
                    if not reader.cancelled() and (err := reader.exception()) is not None:
                        raise err
                    return
                ch = st.channel
                if ch is not None and ch.released is not None:
                    raise FailedPrecondition(ch.released)
                if st.expired:
                    raise Unauthenticated(TOKEN_EXPIRED)
        finally:
            st.close()
            reader.cancel()
            ch = st.channel
            if ch is not None:
                ch.publisher_wakers.discard(st.wake)
                ch.publishers -= 1
                self._metrics.publishers.dec()

    async def _read(
        self,
        request_iterator: AsyncIterator[vitals_pb2.PublishVitalsRequest],
        context: Context,
        st: _PublishStream,
    ) -> None:
        m = self._metrics
        async for req in request_iterator:
            batch = req.batch
            channel = st.channel
            if channel is None:
                if not batch.session_id:
                    raise InvalidArgument(
                        "batch.session_id must be set (the first request carries a batch)"
                    )
                claims = self._claims(context, batch.session_id, ("publisher",))
                channel = await self._sessions.channel_for(claims)
                st.expire_at(claims)
                st.channel = channel
                channel.publishers += 1
                channel.publisher_wakers.add(st.wake)
                m.publishers.inc()
                self._sessions.report_now.set()
                log.info(
                    "publisher connected",
                    extra={"session": channel.session_id, "edge": self._sessions.edge_id},
                )
            if req.refresh_token:
                self._refresh(req.refresh_token, channel.session_id, st)
                if not req.HasField("batch"):
                    continue
            if batch.session_id != channel.session_id:
                raise PermissionDenied(
                    f"this stream publishes session {channel.session_id}, not {batch.session_id}"
                )
            if channel.released is not None:
                raise FailedPrecondition(channel.released)
            if 0 < batch.seq < st.last_seq and not channel.watermark.seen(batch.seq):
                raise InvalidArgument(
                    f"seq went backwards on this stream ({batch.seq} after {st.last_seq}); "
                    f"resume from {channel.watermark.value + 1} on a new stream"
                )
            now = time.time_ns()
            result = channel.admit(batch, now)
            if result.accepted or result.tombstone:
                # A seq refused without being consumed (far ahead) does not count: the
                # device resends from the watermark on this same stream.
                st.last_seq = max(st.last_seq, batch.seq)
                journaled = (
                    batch
                    if result.accepted
                    else vitals_pb2.VitalsBatch(session_id=channel.session_id, seq=batch.seq)
                )
                try:
                    await self._journal.append(
                        channel.session_id,
                        channel.patient_id,
                        batch.seq,
                        now,
                        journaled,
                        rejected=result.tombstone,
                    )
                except JournalError as e:
                    # What the channel believes received is no longer true: forget it,
                    # the device resends from the archived watermark.
                    self._sessions.channels.pop(channel.session_id, None)
                    raise Unavailable(f"edge journal failed ({e}); reconnect") from e
                channel.journaled(batch.seq)
                if result.accepted and (alerts := channel.process(batch, now, result.waveforms)):
                    m.news2_alerts.inc(alerts)
            if result.accepted:
                m.batches_accepted.inc()
            elif result.duplicate:
                m.batches_duplicate.inc()
                st.duplicates += 1
            elif result.rejection is not None:
                m.batches_rejected.inc()
                err = result.rejection
                st.rejections.append(
                    vitals_pb2.BatchRejection(
                        seq=batch.seq, code=status_of(err).value[0], message=err.message
                    )
                )
                # The device's message may quote the values; the log names fields only.
                log.info(
                    "batch rejected",
                    extra={
                        "session": channel.session_id,
                        "seq": batch.seq,
                        "code": err.code.value,
                        "reason": getattr(err, "reason", "unspecified"),
                        "fields": list(getattr(err, "fields", ())),
                    },
                )
            st.ack_due = True
            st.wake()

    def _refresh(self, token: str, session_id: str, st: _PublishStream) -> None:
        """Extend the stream with a fresh token, or tell the device in-band why not: a bad
        refresh never ends a stream whose own token is still good."""
        assert st.claims is not None
        try:
            fresh = self._verifier.verify(token, session_id=session_id, roles=("publisher",))
            check_refresh(st.claims, fresh)
        except DomainError as e:
            st.rejections.append(
                vitals_pb2.BatchRejection(
                    seq=0,
                    code=status_of(e).value[0],
                    message=f"refresh_token refused: {e.message}; this stream keeps its "
                    f"token until it expires at unix {st.claims.expires_unix}",
                )
            )
            log.info("refresh refused", extra={"session": session_id, "reason": e.code.value})
            st.wake()
            return
        st.expire_at(fresh)

    async def Subscribe(
        self, request: vitals_pb2.SubscribeVitalsRequest, context: Context
    ) -> AsyncIterator[vitals_pb2.SubscribeVitalsResponse]:
        if not request.session_id:
            raise InvalidArgument("session_id must be set")
        claims = self._claims(context, request.session_id, ("viewer",))
        channel = await self._sessions.channel_for(claims)
        m = self._metrics
        sub: Subscriber[Event] = Subscriber(
            self._subscriber_queue, on_drop=lambda n: m.fanout_dropped.inc(n)
        )
        # Live events queue up from here on, so the replay below and the live events
        # overlap rather than leave a hole between them.
        channel.subscribe(sub, request.include_latest)
        m.subscribers.inc()
        log.info("subscriber joined", extra={"session": channel.session_id})
        resume_after = request.resume_after_seq
        # When the token expires the view ends; the viewer attaches again and resumes
        # after its last seq, losing nothing.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            sub.close(TOKEN_EXPIRED)

        loop = asyncio.get_running_loop()
        expiry = loop.call_at(loop.time() + max(0.0, claims.expires_unix - time.time()), expire)
        try:
            # Seqs replayed from the journal: their live copies (committed before the
            # replay read them, fanned out after this view joined) are skipped once.
            replayed: set[int] = set()
            if resume_after:
                async for ev in self._replay(channel, resume_after, replayed):
                    yield ev
                    m.events_out.inc()
            while True:
                try:
                    dropped, events = await sub.take()
                except SubscriberClosed as closed:
                    if expired:
                        raise Unauthenticated(TOKEN_EXPIRED) from None
                    raise FailedPrecondition(closed.reason) from None
                if expired:
                    raise Unauthenticated(TOKEN_EXPIRED)
                if dropped:
                    yield vitals_pb2.SubscribeVitalsResponse(
                        session_id=channel.session_id,
                        edge_received_unix_ns=time.time_ns(),
                        gap=vitals_pb2.SubscriptionGap(
                            dropped_events=dropped,
                            reason="subscriber fell behind; oldest events dropped",
                        ),
                    )
                for ev in events:
                    if ev.HasField("batch"):
                        seq = ev.batch.seq
                        # seq 0 is the latest-values snapshot, not a published batch.
                        if seq and (seq <= resume_after or seq in replayed):
                            continue
                        m.sample_age.observe(
                            max(0.0, (time.time_ns() - ev.batch.device_time_unix_ns) / 1e9)
                        )
                    yield ev
                    m.events_out.inc()
                # Every live copy of a replayed batch was queued before the replay ended,
                # so the first take held them all.
                replayed.clear()
        finally:
            expiry.cancel()
            channel.fanout.remove(sub)
            m.subscribers.dec()

    async def _replay(
        self, channel: SessionChannel, after: int, replayed: set[int]
    ) -> AsyncIterator[vitals_pb2.SubscribeVitalsResponse]:
        """The journaled batches with seq > after, in seq order; first one gap naming the
        seqs up to the received watermark that this edge does not hold (journaled on
        another edge before a move, or pruned once archived): the archive has those."""
        sid = channel.session_id
        upto = channel.received.value
        held = await asyncio.to_thread(self._journal.session_seqs, sid, after)
        missing = _missing(after, upto, held)
        if missing is not None:
            first, last = missing
            yield vitals_pb2.SubscribeVitalsResponse(
                session_id=sid,
                edge_received_unix_ns=time.time_ns(),
                gap=vitals_pb2.SubscriptionGap(
                    first_missing_seq=first,
                    last_missing_seq=last,
                    reason=f"edge {self._sessions.edge_id} does not hold seqs {first}-{last}; "
                    "read them from the archive (ArchiveService.QueryVitals)",
                ),
            )
        cursor = after
        while True:
            entries = await asyncio.to_thread(self._journal.read_session, sid, cursor, REPLAY_PAGE)
            for e in entries:
                cursor = e.seq
                # Tombstones are consumed seqs with nothing to show; a seq journaled twice
                # (this edge restarted, or the session came back) is shown once.
                if e.rejected or e.seq in replayed:
                    continue
                replayed.add(e.seq)
                yield vitals_pb2.SubscribeVitalsResponse(
                    session_id=sid,
                    edge_received_unix_ns=e.edge_received_unix_ns,
                    batch=vitals_pb2.VitalsBatch.FromString(e.batch),
                )
            if len(entries) < REPLAY_PAGE:
                return


def _missing(after: int, upto: int, held: set[int]) -> tuple[int, int] | None:
    """The first and last seq in (after, upto] not in held, or None when all are held."""
    if upto <= after:
        return None
    inside = sum(1 for s in held if after < s <= upto)
    if inside == upto - after:
        return None
    first = after + 1
    while first in held:
        first += 1
    last = upto
    while last in held:
        last -= 1
    return first, last
