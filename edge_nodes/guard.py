"""Limits and audit at the edge's front door: per-session publish rate, idle publish streams,
subscribers per session, and an audit record of every vitals subscription that reads data."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from telehealth.config import EdgeSettings
from telehealth.errors import DeadlineExceeded, DomainError, ResourceExhausted, Unavailable
from telehealth.rpc import Context, Handler, channel_options, secure_channel, token_from
from telehealth.security.tokens import TokenVerifier
from telehealth.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

PUBLISH = "/telehealth.v1.VitalsService/Publish"
SUBSCRIBE = "/telehealth.v1.VitalsService/Subscribe"
MAX_BUCKETS = 50_000
AUDIT_BACKLOG = 100_000
AUDIT_BATCH = 500


class TokenBucket:
    """`rate` tokens per second up to `burst`; one token per batch."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, float(burst), clock
        self.tokens, self._last = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)


class AuditTrail:
    """Records of patient-data reads at this edge, held until the core has chained them.
    Bounded: when the core is away too long, new reads are refused rather than left unaudited."""

    def __init__(self, edge_id: str) -> None:
        self.edge_id = edge_id
        self.boot_id = uuid.uuid4().hex
        self.pending: deque[audit_pb2.AuditRecord] = deque()
        self._seq = 0
        self.shipped = 0

    def full(self) -> bool:
        return len(self.pending) >= AUDIT_BACKLOG

    def record(self, *, subject: str, role: str, action: str, session_id: str, peer: str) -> None:
        self._seq += 1
        self.pending.append(
            audit_pb2.AuditRecord(
                at_unix_ns=time.time_ns(),
                subject=subject,
                role=role,
                action=action,
                session_id=session_id,
                peer=peer,
                outcome="allowed",
                edge_seq=self._seq,
            )
        )

    def ack(self, edge_seq: int) -> None:
        while self.pending and self.pending[0].edge_seq <= edge_seq:
            self.pending.popleft()
            self.shipped += 1

    async def ship(
        self, settings: EdgeSettings, stop: asyncio.Event, period_s: float = 0.5
    ) -> None:
        """Store-and-forward to the core's AuditService until stop; retried on every failure."""
        while not stop.is_set():
            try:
                async with secure_channel(
                    settings.core_address, settings.tls(), channel_options()
                ) as ch:
                    stub = audit_pb2_grpc.AuditServiceStub(ch)
                    while not stop.is_set():
                        if self.pending:
                            batch = [
                                self.pending[i] for i in range(min(AUDIT_BATCH, len(self.pending)))
                            ]
                            resp = await stub.Append(
                                audit_pb2.AppendAuditRequest(
                                    edge_id=self.edge_id, edge_boot_id=self.boot_id, records=batch
                                ),
                                timeout=10,
                            )
                            self.ack(resp.acked_edge_seq)
                            if self.pending:
                                continue
                        try:
                            await asyncio.wait_for(stop.wait(), period_s)
                        except TimeoutError:
                            pass
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "audit shipping failed; retrying",
                    extra={"code": e.code().name, "pending": len(self.pending)},
                )
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
        # Last chance on a graceful stop: whatever is pending goes now.
        if self.pending:
            try:
                async with secure_channel(settings.core_address, settings.tls()) as ch:
                    resp = await audit_pb2_grpc.AuditServiceStub(ch).Append(
                        audit_pb2.AppendAuditRequest(
                            edge_id=self.edge_id,
                            edge_boot_id=self.boot_id,
                            records=list(self.pending)[:AUDIT_BATCH],
                        ),
                        timeout=2,
                    )
                    self.ack(resp.acked_edge_seq)
            except grpc.aio.AioRpcError:
                log.error("audit records not shipped at shutdown", extra={"n": len(self.pending)})


class EdgeGuard(grpc.aio.ServerInterceptor):
    def __init__(self, settings: EdgeSettings, verifier: TokenVerifier, audit: AuditTrail) -> None:
        self._s = settings
        self._verifier = verifier
        self.audit = audit
        # LRU of per-session buckets: survives reconnects (a new stream is not a new allowance)
        # and stays bounded however many session ids a hostile peer invents.
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.subscribers: dict[str, int] = {}

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

    def _verified(self, context: Context, session_id: str, role: str) -> Any:
        try:
            return self._verifier.verify(
                token_from(context.invocation_metadata()), session_id=session_id, roles=(role,)
            )
        except DomainError:
            return None  # the servicer refuses it with the precise status

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
                    async for resp in inner_us(request, context):
                        yield resp
                    return
                n = self.subscribers.get(sid, 0)
                if n >= self._s.max_subscribers_per_session:
                    raise ResourceExhausted(
                        f"session already has {n} viewers (at most "
                        f"{self._s.max_subscribers_per_session}); close another view first"
                    )
                if self.audit.full():
                    raise Unavailable("audit backlog full (core unreachable); try again shortly")
                self.subscribers[sid] = n + 1
                audited = False
                try:
                    async for resp in inner_us(request, context):
                        if not audited:
                            # Recorded before the first data leaves the edge.
                            self.audit.record(
                                subject=claims.subject_id or f"session:{sid}",
                                role="viewer",
                                action="vitals.subscribe",
                                session_id=sid,
                                peer=context.peer() or "",
                            )
                            audited = True
                        yield resp
                finally:
                    left = self.subscribers.get(sid, 1) - 1
                    if left <= 0:
                        self.subscribers.pop(sid, None)
                    else:
                        self.subscribers[sid] = left

            return grpc.unary_stream_rpc_method_handler(
                subscribe,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _limited(self, request_iterator: Any, context: Context) -> AsyncIterator[Any]:
        """The publish stream as the servicer sees it: idle streams end, floods are refused."""
        it = aiter(request_iterator)
        idle = self._s.publish_idle_timeout_s
        bucket: TokenBucket | None = None
        checked = False
        while True:
            try:
                # asyncio.timeout needs no task per message, unlike wait_for (a hot path).
                async with asyncio.timeout(idle):
                    req = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no batch for {idle:g}s; the stream is closed, open a new one to go on"
                ) from None
            if not checked:
                checked = True
                sid = req.batch.session_id
                # Only a verified publisher spends its session's allowance: nobody else can
                # exhaust a patient's bucket by naming their session.
                if sid and self._verified(context, sid, "publisher") is not None:
                    bucket = self.bucket(sid)
            if bucket is not None and not bucket.take():
                raise ResourceExhausted(
                    f"publishing faster than {self._s.publish_rate_batches_per_s:g} batches/s "
                    f"(burst {self._s.publish_burst_batches}); resume in {bucket.wait_s():.2f}s "
                    "from the acknowledged watermark"
                )
            yield req
