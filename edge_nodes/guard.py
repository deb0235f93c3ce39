"""Limits and audit at the edge's front door: per-session publish pacing, idle publish streams,
subscribers per session, and a durable audit record of every read of patient data (allowed or
refused) that ships to the core's chain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from telehealth.config import EdgeSettings
from telehealth.errors import (
    DeadlineExceeded,
    DomainError,
    ErrorCode,
    ResourceExhausted,
    Unavailable,
)
from telehealth.rpc import Context, Handler, channel_options, secure_channel, token_from
from telehealth.security.audit import ACTIONS
from telehealth.security.tokens import SessionClaims, TokenVerifier
from telehealth.telemetry.metrics import GuardMetrics
from telehealth.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

PUBLISH = "/telehealth.v1.VitalsService/Publish"
SUBSCRIBE = "/telehealth.v1.VitalsService/Subscribe"
MAX_BUCKETS = 50_000
AUDIT_BACKLOG = 100_000
AUDIT_BATCH = 500
# A stopping edge ships what is pending for at most this long (the rest waits on disk).
AUDIT_FINAL_S = 5.0
# The same refusal (who, what, session, from where) is recorded once per window: a flood of
# junk tokens must not become a flood of chain entries, yet every kind of refusal is seen.
DENIED_WINDOW_S = 60.0
MAX_DENIED_KEYS = 10_000
# Statuses meaning the edge refused the read (rather than the stream failing later).
REFUSALS = (
    ErrorCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED,
    ErrorCode.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION,
    ErrorCode.NOT_FOUND,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_outbox (
    edge_seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_stream (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    stream_id TEXT NOT NULL
);
"""


class TokenBucket:
    """`rate` tokens per second up to `burst`; one token per batch. reserve() may go into
    debt: the caller waits out the debt (pacing) instead of being refused."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, float(burst), clock
        self.tokens, self._last = float(burst), clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def reserve(self) -> float:
        """Take one token now, owed if need be; return how long to wait until it is paid."""
        self._refill()
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self) -> None:
        self.tokens += 1.0

    def wait_s(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)


class AuditTrail:
    """Records of patient-data reads at this edge, written to SQLite (beside the journal)
    before the read proceeds and kept there until the core has chained them: a crash or a
    long core outage loses none. Bounded: past AUDIT_BACKLOG unshipped records new reads are
    refused rather than left unaudited.

    edge_seq is the outbox's row id, increasing across restarts, and the boot id sent with
    it names the outbox file (not the process), so the core's dedup holds across restarts."""

    def __init__(self, edge_id: str, path: Path | None = None) -> None:
        self.edge_id = edge_id
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:")
        # synchronous=NORMAL in WAL: a commit survives the process being killed.
        self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;" + SCHEMA)
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO audit_stream (id, stream_id) VALUES (1, ?)",
                (uuid.uuid4().hex,),
            )
        self.boot_id = str(self._db.execute("SELECT stream_id FROM audit_stream").fetchone()[0])
        self._pending = int(self._db.execute("SELECT COUNT(*) FROM audit_outbox").fetchone()[0])
        self.shipped = 0
        self.denied_recorded = 0
        self._denied: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()
        self.metrics: GuardMetrics | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def full(self) -> bool:
        return self._pending >= AUDIT_BACKLOG

    def _coalesced(self, key: tuple[str, str, str, str]) -> bool:
        now = time.monotonic()
        seen = self._denied.get(key)
        if seen is not None and now - seen < DENIED_WINDOW_S:
            return True
        self._denied[key] = now
        self._denied.move_to_end(key)
        while len(self._denied) > MAX_DENIED_KEYS:
            self._denied.popitem(last=False)
        return False

    def record(
        self,
        *,
        subject: str,
        role: str,
        action: str,
        session_id: str,
        peer: str,
        outcome: str = "allowed",
    ) -> bool:
        """The one way to audit a read at the edge: durable when this returns (raises
        Unavailable when it cannot be, so the read does not happen unaudited). A refusal
        repeated within DENIED_WINDOW_S is recorded once; returns whether this one was."""
        if outcome not in ("allowed", "denied"):
            raise ValueError("outcome must be allowed or denied")
        if action not in ACTIONS:
            # The core refuses unknown actions; one would block the outbox behind it.
            raise ValueError(f"unknown audit action {action!r} (one of {', '.join(ACTIONS)})")
        if outcome == "denied":
            host = peer.rsplit(":", 1)[0]
            if self._coalesced((subject, action, session_id, host)):
                return False
        elif self.full():
            raise Unavailable("audit backlog full (core unreachable); try again shortly")
        rec = audit_pb2.AuditRecord(
            at_unix_ns=time.time_ns(),
            subject=subject[:256],
            role=role[:64],
            action=action,
            session_id=session_id[:128],
            peer=peer[:256],
            outcome=outcome,
        )
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO audit_outbox (record) VALUES (?)", (rec.SerializeToString(),)
                )
        except sqlite3.Error as e:
            log.error("cannot persist an audit record", extra={"error": str(e)})
            raise Unavailable("this edge cannot record the read right now; try again") from e
        self._pending += 1
        if outcome == "denied":
            self.denied_recorded += 1
        if self.metrics is not None:
            (self.metrics.audit_denied if outcome == "denied" else self.metrics.audit_allowed).inc()
            self.metrics.audit_pending.set(self._pending)
        return True

    def record_refusal(
        self, who: SessionClaims | None, action: str, session_id: str, peer: str
    ) -> None:
        """A refused read: under the subject of `who` (claims whose signature is ours, even if
        wrong for this read), else as unauthenticated. Best effort: the refusal goes out
        whether or not it could be recorded."""
        subject = (
            "unauthenticated" if who is None else who.subject_id or f"session:{who.session_id}"
        )
        with contextlib.suppress(Unavailable):
            self.record(
                subject=subject,
                role=who.role if who is not None else "",
                action=action,
                session_id=session_id,
                peer=peer,
                outcome="denied",
            )

    def batch(self, limit: int = AUDIT_BATCH) -> list[audit_pb2.AuditRecord]:
        out = []
        for seq, raw in self._db.execute(
            "SELECT edge_seq, record FROM audit_outbox ORDER BY edge_seq LIMIT ?", (limit,)
        ):
            r = audit_pb2.AuditRecord.FromString(raw)
            r.edge_seq = seq
            out.append(r)
        return out

    def ack(self, edge_seq: int) -> None:
        with self._db:
            n = self._db.execute("DELETE FROM audit_outbox WHERE edge_seq <= ?", (edge_seq,))
        self._pending = max(0, self._pending - n.rowcount)
        self.shipped += n.rowcount
        if self.metrics is not None:
            self.metrics.audit_pending.set(self._pending)

    async def _ship_pending(self, stub: Any, timeout: float, deadline: float | None) -> None:
        while self._pending and (deadline is None or time.monotonic() < deadline):
            batch = self.batch()
            if not batch:
                self._pending = 0
                return
            resp = await stub.Append(
                audit_pb2.AppendAuditRequest(
                    edge_id=self.edge_id, edge_boot_id=self.boot_id, records=batch
                ),
                timeout=timeout,
            )
            before = self._pending
            self.ack(resp.acked_edge_seq)
            if self._pending == before:
                return  # the core acknowledged nothing new: try again on the next round

    async def ship(
        self, settings: EdgeSettings, stop: asyncio.Event, period_s: float = 0.5
    ) -> None:
        """Store-and-forward to the core's AuditService until stop; retried on every failure.
        On a graceful stop everything pending goes (within AUDIT_FINAL_S); what cannot stays
        on disk for the next start."""
        while not stop.is_set():
            try:
                async with secure_channel(
                    settings.core_address, settings.tls(), channel_options()
                ) as ch:
                    stub = audit_pb2_grpc.AuditServiceStub(ch)
                    while not stop.is_set():
                        await self._ship_pending(stub, 10, None)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), period_s)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "audit shipping failed; retrying",
                    extra={"code": e.code().name, "pending": self._pending},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        if self._pending:
            try:
                async with secure_channel(settings.core_address, settings.tls()) as ch:
                    stub = audit_pb2_grpc.AuditServiceStub(ch)
                    await self._ship_pending(stub, 2, time.monotonic() + AUDIT_FINAL_S)
            except grpc.aio.AioRpcError:
                pass
            if self._pending:
                log.warning(
                    "audit records kept on disk for the next start",
                    extra={"pending": self._pending},
                )

    def close(self) -> None:
        self._db.close()


class _IdleWatch:
    """One timer per publish stream instead of a timeout per message (a hot path): each batch
    only stamps the time; the timer checks the stamp and, when the stream has been silent for
    `idle_s`, cancels the reading task, which _limited turns into DEADLINE_EXCEEDED."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.waiting = False
        self.fired = False
        self.task = asyncio.current_task()
        self._handle = self.loop.call_at(self.last + idle_s, self._check)

    def _check(self) -> None:
        due = self.last + self.idle_s
        if self.loop.time() >= due and self.waiting and self.task is not None:
            self.fired = True
            self.task.cancel()
            return
        self._handle = self.loop.call_at(max(due, self.loop.time() + self.idle_s / 8), self._check)

    def close(self) -> None:
        self._handle.cancel()


class EdgeGuard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        settings: EdgeSettings,
        verifier: TokenVerifier,
        audit: AuditTrail,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._s = settings
        self._verifier = verifier
        self.audit = audit
        self.metrics = (
            GuardMetrics(registry, settings.edge_id, settings.zone)
            if registry is not None
            else None
        )
        audit.metrics = self.metrics
        # LRU of per-session buckets: survives reconnects (a new stream is not a new allowance)
        # and stays bounded however many session ids a hostile peer invents.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.subscribers: dict[str, int] = {}
        # Pacing seen so far (waits and their total), for tests and the metrics.
        self.paced = 0
        self.paced_s = 0.0

    def bucket(self, session_id: str) -> TokenBucket:
        b = self._buckets.get(session_id)
        if b is None:
            b = TokenBucket(self._s.publish_rate_batches_per_s, self._s.publish_burst_batches)
            self._buckets[session_id] = b
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(session_id)
        return b

    @contextlib.contextmanager
    def viewer_slot(self, session_id: str) -> Iterator[None]:
        """Hold one of the session's max_subscribers_per_session viewer places for the life
        of a view (gRPC Subscribe and the browser WebSocket alike); ResourceExhausted when
        they are all taken."""
        n = self.subscribers.get(session_id, 0)
        cap = self._s.max_subscribers_per_session
        if n >= cap:
            raise ResourceExhausted(
                f"session already has {n} viewers (at most {cap}); close another view first"
            )
        self.subscribers[session_id] = n + 1
        try:
            yield
        finally:
            left = self.subscribers.get(session_id, 1) - 1
            if left <= 0:
                self.subscribers.pop(session_id, None)
            else:
                self.subscribers[session_id] = left

    def _verified(self, context: Context, session_id: str, role: str) -> SessionClaims | None:
        try:
            return self._verifier.verify(
                token_from(context.invocation_metadata()), session_id=session_id, roles=(role,)
            )
        except DomainError:
            return None  # the servicer refuses it with the precise status

    def _refused(self, context: Context, session_id: str, claims: SessionClaims | None) -> None:
        """Record a refused read: under the verified subject when the token is genuine (wrong
        session, role or edge, expired, over the cap), else as unauthenticated."""
        who = claims or self._verifier.identify(token_from(context.invocation_metadata()))
        self.audit.record_refusal(who, "vitals.subscribe", session_id, context.peer() or "")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        if details.method == PUBLISH and handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream

            async def publish(request_iterator: Any, context: Context) -> AsyncIterator[Any]:
                async for resp in inner_ss(self._limited(request_iterator, context), context):
                    yield resp

            return grpc.stream_stream_rpc_method_handler(
                publish,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if details.method == SUBSCRIBE and handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def subscribe(request: Any, context: Context) -> AsyncIterator[Any]:
                sid = request.session_id
                claims = self._verified(context, sid, "viewer") if sid else None
                if claims is None:
                    # The servicer names the precise refusal; it is recorded on the way out.
                    try:
                        async for resp in inner_us(request, context):
                            yield resp
                    except DomainError as e:
                        if e.code in REFUSALS:
                            self._refused(context, sid, None)
                        raise
                    return
                if self.audit.full():
                    raise Unavailable("audit backlog full (core unreachable); try again shortly")
                try:
                    slot = self.viewer_slot(sid)
                    slot.__enter__()
                except ResourceExhausted:
                    self._refused(context, sid, claims)
                    raise
                audited = False
                try:
                    async for resp in inner_us(request, context):
                        if not audited:
                            # Durable before the first data leaves the edge.
                            self.audit.record(
                                subject=claims.subject_id or f"session:{sid}",
                                role="viewer",
                                action="vitals.subscribe",
                                session_id=sid,
                                peer=context.peer() or "",
                            )
                            audited = True
                        yield resp
                except DomainError as e:
                    if not audited and e.code in REFUSALS:
                        self._refused(context, sid, claims)
                    raise
                finally:
                    slot.__exit__(None, None, None)

            return grpc.unary_stream_rpc_method_handler(
                subscribe,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _limited(self, request_iterator: Any, context: Context) -> AsyncIterator[Any]:
        """The publish stream as the servicer sees it: idle streams end; a publisher over its
        session's rate is paced (the next batch is read only when the allowance has refilled,
        so HTTP/2 flow control slows the device down) rather than cut off. Only gross abuse
        is refused: owing more than a whole burst, which one stream cannot do (it waits for
        each batch it owes), only many parallel streams of one session can."""
        it = aiter(request_iterator)
        watch = _IdleWatch(self._s.publish_idle_timeout_s)
        bucket: TokenBucket | None = None
        checked = False
        try:
            while True:
                watch.waiting = True
                try:
                    req = await anext(it)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not watch.fired:
                        raise
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    raise DeadlineExceeded(
                        f"no batch for {watch.idle_s:g}s; the stream is closed, open a new one "
                        "to go on"
                    ) from None
                watch.waiting = False
                watch.last = watch.loop.time()
                if not checked:
                    checked = True
                    sid = req.batch.session_id
                    # Only a verified publisher spends its session's allowance: nobody else
                    # can slow a patient's device by naming its session.
                    if sid and self._verified(context, sid, "publisher") is not None:
                        bucket = self.bucket(sid)
                if bucket is not None:
                    wait = bucket.reserve()
                    if wait > 0:
                        if wait > bucket.burst / bucket.rate:
                            bucket.refund()
                            raise ResourceExhausted(
                                f"this session owes more than a burst "
                                f"({self._s.publish_burst_batches} batches at "
                                f"{self._s.publish_rate_batches_per_s:g}/s) across its streams; "
                                "publish on one stream and resume from the acknowledged "
                                "watermark"
                            )
                        self.paced += 1
                        self.paced_s += wait
                        if self.metrics is not None:
                            self.metrics.paced.inc()
                            self.metrics.paced_seconds.inc(wait)
                        await asyncio.sleep(wait)
                yield req
        finally:
            watch.close()
