"""telehealth-device: a patient's device agent streaming a simulated patient through the mesh."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from clients.dial import edge_channel
from clients.simulator import PatientSimulator
from clients.tlsflags import add_tls_flags, tls_from_flags
from telehealth.rpc import (
    bearer,
    install_signal_handlers,
    jittered,
    secure_channel,
    wait_backoff,
    with_refresh_token,
)
from telehealth.security.tls import TlsFiles
from telehealth.telemetry.logging import configure_logging
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
)

log = logging.getLogger("device")

PUBLISH_METHOD = "/telehealth.v1.VitalsService/Publish"
# The backlog (batches the archive does not hold yet) is bounded by its encoded size. At the
# default rate (25 batches/s of 40 ms of 250 Hz ECG plus a reading a second) a batch is ~117
# bytes, 10.5 MB an hour (measured), so 80 MiB holds ~8 hours: a device offline through a
# night shift loses nothing. In memory it costs ~1.5x that (one bytes object per batch; as
# message objects it would be 8x), which a phone or bedside gateway can spare. A bound in
# batches rather than bytes would be wrong by 10x for a device sending PPG at 500 Hz.
DEFAULT_MAX_BACKLOG_BYTES = 80 * 1024 * 1024
# Batches/s a stream sends while catching up a backlog: below the edge's default per-session
# limit (publish_rate_batches_per_s = 200) with room for the live 25/s, so a resend after an
# outage never trips a limiter; a 10-minute backlog still drains in ~2 minutes.
DEFAULT_CATCHUP_RATE = 150.0
# How far into a token's lifetime it is renewed (INTERFACES §5: before ~2/3 of it).
REFRESH_AT_FRACTION = 2 / 3
BACKOFF_START_S = 0.05
BACKOFF_CAP_S = 30.0
# A limiter refusal waits at least this long: retrying at once would be refused again.
RATE_LIMITED_BACKOFF_S = 1.0
# Refusals of Open that no retry can fix (bad flags, a certificate that is not a device's).
FATAL_OPEN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}
# Losing the edge with these means it (or the path to it) is gone: tell the core at once.
EDGE_GONE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
STATUS_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
# Field names a rejection message may name; the log keeps only these words of it, because
# the message also quotes the refused value (a patient's vitals never go to logs).
_FIELD_NAMES = frozenset(
    f.name
    for m in (vitals_pb2.VitalsBatch, vitals_pb2.VitalSigns, vitals_pb2.WaveformChunk)
    for f in m.DESCRIPTOR.fields
)
_WORD = re.compile(r"[a-z][a-z0-9_]*")


def fields_named(message: str) -> list[str]:
    """The proto field names a rejection message mentions, in order, without its values."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(message):
        if w in _FIELD_NAMES:
            seen.setdefault(w, None)
    return list(seen)


@dataclass
class DeviceStats:
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    duplicates: int = 0
    # Publish streams lost and opened again (edge death, network loss, refusals). A move
    # (drain, zone change, rebalance) done make-before-break is a handover, not a reconnect.
    reconnects: int = 0
    handovers: int = 0
    # Streams the edge ended for publishing too fast (RESOURCE_EXHAUSTED).
    rate_limited: int = 0
    # Calls to the core that failed (it was down or refused); the device kept its data.
    core_failures: int = 0
    token_refreshes: int = 0
    refresh_refused: int = 0
    # Batches dropped unarchived because the backlog passed its bound (never silently: each
    # episode is logged as an error), and how many times that happened.
    dropped_unacked: int = 0
    backlog_overflows: int = 0
    peak_backlog_bytes: int = 0
    archived: int = 0
    edges: list[str] = field(default_factory=list)
    # Seconds from the last acknowledgement before each loss to the first one after it.
    gaps_s: list[float] = field(default_factory=list)
    # Seconds from the move's start (ChangeZone asked, or `moving` heard from the old edge)
    # to the first acknowledgement from the NEW edge.
    handovers_s: list[float] = field(default_factory=list)
    # The session was closed at the core (by an operator); the device stopped.
    closed: bool = False


@dataclass
class DeviceConfig:
    core_address: str
    patient_id: str
    zone: str
    scenario: str = "stable"
    seed: int = 0
    ecg_rate_hz: float = 250.0
    batch_interval_s: float = 0.04
    vitals_interval_s: float = 1.0
    spo2_scale: int = 1
    deterioration_s: float = 180.0
    device_id: str = ""
    # mTLS to core and edges: the device's enrolment certificate (None = plaintext).
    tls: TlsFiles | None = None
    max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES
    catchup_rate_batches_per_s: float = DEFAULT_CATCHUP_RATE
    # After stop: how long to wait for the archive to hold everything before giving up.
    flush_timeout_s: float = 10.0


class Backlog:
    """Every batch the archive does not hold yet, as encoded PublishVitalsRequests, by seq.

    Seqs are contiguous (the device numbers batches itself), so a deque indexed from
    `first_seq` is enough. Batches are kept encoded: ten times smaller than message objects,
    and sent as they are (the stub takes bytes).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[bytes] = deque()
        self.first_seq = 1
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self._items) - 1

    def append(self, seq: int, data: bytes) -> int:
        """Add the next batch; return how many of the oldest had to go to stay in bound."""
        if not self._items:
            self.first_seq = seq
        elif seq != self.last_seq + 1:
            raise ValueError(f"batch {seq} after {self.last_seq}: the backlog must be contiguous")
        self._items.append(data)
        self.bytes += len(data)
        dropped = 0
        while self.bytes > self.max_bytes and len(self._items) > 1:
            self.bytes -= len(self._items.popleft())
            self.first_seq += 1
            dropped += 1
        return dropped

    def release_through(self, seq: int) -> None:
        while self._items and self.first_seq <= seq:
            self.bytes -= len(self._items.popleft())
            self.first_seq += 1
        if not self._items and self.first_seq <= seq:
            self.first_seq = seq + 1

    def get(self, seq: int) -> bytes | None:
        i = seq - self.first_seq
        return self._items[i] if 0 <= i < len(self._items) else None


class _Pacer:
    """Token bucket on the sending side: a backlog goes out at `rate`, not as one burst."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self._last = burst, time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


@dataclass(eq=False)
class _Stream:
    """One Publish call to one edge."""

    assignment: sessions_pb2.Assignment
    token: str
    channel: grpc.aio.Channel
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    edge_received: int = 0
    acked: bool = False
    # A fresh token to send in-band with the next batch (PublishVitalsRequest.refresh_token).
    refresh_token: str = ""
    moving_heard: bool = False
    closed: bool = False

    @property
    def edge_id(self) -> str:
        return self.assignment.edge_id


# What the session loop hears from streams, the producer and change_zone.
@dataclass(frozen=True)
class _Acked:
    stream: _Stream


@dataclass(frozen=True)
class _Ended:
    stream: _Stream
    error: grpc.aio.AioRpcError | None


@dataclass(frozen=True)
class _Moving:
    stream: _Stream
    new_edge_id: str
    reason: str


@dataclass(frozen=True)
class _MoveTo:
    assignment: sessions_pb2.Assignment
    asked_at: float


@dataclass(frozen=True)
class _Finished:
    pass


@dataclass(frozen=True)
class _Lost:
    """How the stream to an edge was lost."""

    error: grpc.aio.AioRpcError | None
    acked: bool
    edge_id: str


_Note = _Acked | _Ended | _Moving | _MoveTo | _Finished


class SessionClosed(Exception):
    """The core says the session is closed: nothing more to publish."""


class DeviceAgent:
    """Opens a session, streams batches on the clock, keeps every batch until the archive has
    it, and on any loss asks the core for the current placement and resumes after the archived
    watermark. Moves (drain, zone change) are make-before-break: the stream to the new edge is
    open and acknowledged before the old one is closed. Never gives up on a recoverable status
    (rate limiting, an expired token, an unreachable core or edge)."""

    def __init__(self, cfg: DeviceConfig) -> None:
        self.cfg = cfg
        self.sim = PatientSimulator(
            cfg.scenario,
            seed=cfg.seed,
            ecg_rate_hz=cfg.ecg_rate_hz,
            deterioration_s=cfg.deterioration_s,
            spo2_scale=cfg.spo2_scale,
        )
        self.stats = DeviceStats()
        self.session_id = ""
        # The assignment of the stream in use (video follows it; a new object means a move).
        self.assignment: sessions_pb2.Assignment | None = None
        # The freshest publisher token (renewed in place, without a new assignment).
        self.token = ""
        self.token_expires_unix_ns = 0
        self._token_received_ns = 0
        self.received_seq = 0
        self.archived_seq = 0
        self._last_ack = 0.0
        self._lost_at: float | None = None
        self._sessions_stub: sessions_pb2_grpc.SessionsServiceAsyncStub | None = None
        self._backlog = Backlog(cfg.max_backlog_bytes)
        self._overflowing = False
        self._dropped_through = 0
        self._next_seq = 1
        self._streams: set[_Stream] = set()
        self._notes: asyncio.Queue[_Note] = asyncio.Queue()
        self._catchup_rate = cfg.catchup_rate_batches_per_s
        self.opened = asyncio.Event()

    @property
    def pending(self) -> int:
        """Batches held until the archive has them."""
        return len(self._backlog)

    # -- batches ---------------------------------------------------------------------

    def make_batch(self, t0_ns: int, t_s: float, with_vitals: bool) -> vitals_pb2.VitalsBatch:
        n = max(1, round(self.cfg.ecg_rate_hz * self.cfg.batch_interval_s))
        start_ns = t0_ns + int(t_s * 1e9)
        batch = vitals_pb2.VitalsBatch(
            session_id=self.session_id, seq=self._next_seq, device_time_unix_ns=time.time_ns()
        )
        batch.waveforms.add(
            kind=vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II,
            start_time_unix_ns=start_ns,
            sample_rate_hz=self.cfg.ecg_rate_hz,
            samples=self.sim.ecg_chunk(t_s, n).tolist(),
        )
        if with_vitals:
            v = self.sim.vitals_at(t_s)
            batch.vitals.add(
                device_time_unix_ns=batch.device_time_unix_ns,
                heart_rate_bpm=v["heart_rate_bpm"],
                spo2_percent=v["spo2_percent"],
                respiration_rate_bpm=v["respiration_rate_bpm"],
                systolic_mmhg=v["systolic_mmhg"],
                diastolic_mmhg=v["diastolic_mmhg"],
                temperature_c=v["temperature_c"],
                consciousness=int(v["consciousness"]),
                oxygen_support=int(v["oxygen_support"]),
            )
        self._next_seq += 1
        return batch

    def next_seq(self) -> int:
        """The seq the next batch must carry (make_batch numbers them itself)."""
        return self._next_seq

    def enqueue(self, batch: vitals_pb2.VitalsBatch) -> None:
        """Keep a batch until archived and hand it to the open streams. Batches come in seq
        order; one built by hand takes next_seq()."""
        if batch.seq >= self._next_seq:
            self._next_seq = batch.seq + 1
        data = vitals_pb2.PublishVitalsRequest(batch=batch).SerializeToString()
        dropped = self._backlog.append(batch.seq, data)
        self.stats.peak_backlog_bytes = max(self.stats.peak_backlog_bytes, self._backlog.bytes)
        if dropped:
            self.stats.dropped_unacked += dropped
            self._dropped_through = self._backlog.first_seq - 1
            if not self._overflowing:
                self._overflowing = True
                self.stats.backlog_overflows += 1
                log.error(
                    "backlog full: dropping the oldest unarchived batches",
                    extra={
                        "session": self.session_id,
                        "max_bytes": self._backlog.max_bytes,
                        "first_kept_seq": self._backlog.first_seq,
                        "archived_seq": self.archived_seq,
                    },
                )
            elif self.stats.dropped_unacked % 1000 == 0:
                log.error(
                    "backlog still full: batches lost",
                    extra={"session": self.session_id, "dropped": self.stats.dropped_unacked},
                )
        for s in self._streams:
            s.wake.set()

    def _lost_marker(self, seq: int) -> bytes:
        # A batch dropped from a full backlog is sent as an empty batch: the edge refuses it,
        # which consumes the seq (a tombstone in the archive), so the watermark can pass it.
        return vitals_pb2.PublishVitalsRequest(
            batch=vitals_pb2.VitalsBatch(
                session_id=self.session_id, seq=seq, device_time_unix_ns=time.time_ns()
            )
        ).SerializeToString()

    def _archived(self, archived_seq: int) -> None:
        # Batches are only let go once the archive has them: any edge may die before that.
        if archived_seq <= self.archived_seq:
            return
        self.archived_seq = archived_seq
        self.stats.archived = archived_seq
        self._backlog.release_through(archived_seq)
        if self._overflowing and self._backlog.bytes < self._backlog.max_bytes // 2:
            self._overflowing = False
            log.warning(
                "backlog below its bound again",
                extra={"session": self.session_id, "dropped": self.stats.dropped_unacked},
            )

    # -- the core -------------------------------------------------------------------------

    def _take_assignment(self, a: sessions_pb2.Assignment) -> None:
        self.token = a.token
        self.token_expires_unix_ns = a.token_expires_unix_ns
        self._token_received_ns = time.time_ns()

    def _refresh_due_in(self) -> float:
        """Seconds until the token should be renewed (inf when its lifetime is unknown)."""
        if not self.token_expires_unix_ns:
            return float("inf")
        life = self.token_expires_unix_ns - self._token_received_ns
        due = self._token_received_ns + life * REFRESH_AT_FRACTION
        return max(0.0, (due - time.time_ns()) / 1e9)

    async def _attach(self, unreachable: str = "") -> sessions_pb2.Assignment:
        """Open the session (first time) or ask where it lives now."""
        sessions = self._sessions_stub
        assert sessions is not None
        if not self.session_id:
            resp = await sessions.Open(
                sessions_pb2.OpenSessionRequest(
                    patient_id=self.cfg.patient_id,
                    zone=self.cfg.zone,
                    spo2_scale=self.cfg.spo2_scale,  # type: ignore[arg-type]
                    device_id=self.cfg.device_id or f"dev-{self.cfg.patient_id}",
                ),
                timeout=5,
            )
            self.session_id = resp.session.session_id
            log.info(
                "session opened",
                extra={"session": self.session_id, "edge": resp.assignment.edge_id},
            )
            self._take_assignment(resp.assignment)
            self.opened.set()
            return resp.assignment
        try:
            resp2 = await sessions.Attach(
                sessions_pb2.AttachSessionRequest(
                    session_id=self.session_id,
                    role=sessions_pb2.ROLE_PUBLISHER,
                    unreachable_edge_id=unreachable,
                ),
                metadata=bearer(self.token),
                timeout=5,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in (e.details() or ""):
                raise SessionClosed(e.details()) from e
            raise
        self._take_assignment(resp2.assignment)
        return resp2.assignment

    # -- streams --------------------------------------------------------------------------

    def _open_stream(self, a: sessions_pb2.Assignment) -> _Stream:
        s = _Stream(a, a.token, edge_channel(a, self.cfg.tls))
        self._streams.add(s)
        s.task = asyncio.create_task(self._run_stream(s))
        return s

    async def _close_stream(self, s: _Stream | None) -> None:
        if s is None or s.closed:
            return
        s.closed = True
        self._streams.discard(s)
        if s.task is not None:
            s.task.cancel()
            await asyncio.gather(s.task, return_exceptions=True)
        await s.channel.close()

    async def _run_stream(self, s: _Stream) -> None:
        publish: grpc.aio.StreamStreamMultiCallable[bytes, vitals_pb2.PublishVitalsResponse]
        publish = s.channel.stream_stream(
            PUBLISH_METHOD,
            request_serializer=None,  # the backlog holds encoded requests
            response_deserializer=vitals_pb2.PublishVitalsResponse.FromString,
        )
        # Writes from a task of our own rather than a request iterator handed to grpc: a
        # stream cancelled mid-move must not leave grpc closing a generator that is waiting.
        call = publish(metadata=bearer(s.token))
        writer = asyncio.create_task(self._write(s, call))
        try:
            while True:
                resp = await call.read()
                if not isinstance(resp, vitals_pb2.PublishVitalsResponse):
                    break  # grpc.aio.EOF: the edge ended the stream
                self._on_response(s, resp)
            self._notes.put_nowait(_Ended(s, None))
        except grpc.aio.AioRpcError as e:
            self._notes.put_nowait(_Ended(s, e))
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            call.cancel()

    async def _write(
        self, s: _Stream, call: grpc.aio.StreamStreamCall[bytes, vitals_pb2.PublishVitalsResponse]
    ) -> None:
        # A new stream resends everything the archive does not hold yet, paced; once this
        # edge acknowledges, what it already has is skipped.
        pacer = _Pacer(self._catchup_rate, burst=max(10.0, self._catchup_rate / 4))
        cursor = self.archived_seq
        while True:
            cursor = max(cursor, self.archived_seq, s.edge_received)
            seq = cursor + 1
            if seq >= self._next_seq:
                s.wake.clear()
                await s.wake.wait()
                continue
            # Not in the backlog below next_seq: dropped when the backlog was full.
            data = self._backlog.get(seq) or self._lost_marker(seq)
            await pacer.take()
            if s.edge_received >= seq or self.archived_seq >= seq:
                continue  # acknowledged while we waited for the pacer
            if s.refresh_token:
                data = with_refresh_token(data, s.refresh_token)
                s.refresh_token = ""
            cursor = seq
            self.stats.sent += 1
            try:
                await call.write(data)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the call is over; the reader reports how

    def _on_response(self, s: _Stream, resp: vitals_pb2.PublishVitalsResponse) -> None:
        if resp.HasField("rejection") and resp.rejection.seq == 0:
            # Not a batch: the edge refused the token sent in-band (the stream keeps its old
            # one until it expires, then the agent attaches again).
            self.stats.refresh_refused += 1
            log.warning(
                "edge refused the renewed token",
                extra={
                    "session": self.session_id,
                    "code": STATUS_NAMES.get(resp.rejection.code, str(resp.rejection.code)),
                },
            )
        elif resp.HasField("rejection"):
            self.stats.rejected += 1
            r = resp.rejection
            if r.seq > self._dropped_through:  # a lost-batch marker is refused by design
                # Seq, status and field names only: the message quotes the refused values.
                log.warning(
                    "edge rejected a batch",
                    extra={
                        "session": self.session_id,
                        "seq": r.seq,
                        "code": STATUS_NAMES.get(r.code, str(r.code)),
                        "fields": fields_named(r.message),
                    },
                )
        self.stats.duplicates += resp.duplicates_dropped
        if resp.HasField("moving") and not s.moving_heard:
            s.moving_heard = True
            self._notes.put_nowait(_Moving(s, resp.moving.new_edge_id, resp.moving.reason))
        if resp.received_seq <= 0:
            return
        now = time.monotonic()
        if self._lost_at is not None:
            # First acknowledgement after a loss: that was the gap the patient's data saw.
            self.stats.gaps_s.append(now - self._lost_at)
            self._lost_at = None
        self._last_ack = now
        s.edge_received = max(s.edge_received, resp.received_seq)
        self.received_seq = max(self.received_seq, resp.received_seq)
        self.stats.acked = self.received_seq
        self._archived(resp.archived_seq)
        if not s.acked:
            s.acked = True
            self._notes.put_nowait(_Acked(s))

    # -- the session loop -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event, duration_s: float = 0.0) -> DeviceStats:
        """Produce and stream until stop (or duration) and every batch is archived."""
        producer = asyncio.create_task(self._produce(stop, duration_s))
        try:
            await self._stream(stop, producer)
        except SessionClosed as e:
            self.stats.closed = True
            log.error("session closed at the core; stopping", extra={"detail": str(e)})
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            for s in list(self._streams):
                await self._close_stream(s)
        return self.stats

    async def _produce(self, stop: asyncio.Event, duration_s: float) -> None:
        await self.opened.wait()
        t0_ns = time.time_ns()
        start = time.monotonic()
        k = 0
        next_vitals = 0.0
        while not stop.is_set():
            t_s = k * self.cfg.batch_interval_s
            if duration_s and t_s >= duration_s:
                break
            with_vitals = t_s >= next_vitals
            if with_vitals:
                next_vitals += self.cfg.vitals_interval_s
            self.enqueue(self.make_batch(t0_ns, t_s, with_vitals))
            k += 1
            delay = start + k * self.cfg.batch_interval_s - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def _done(self, stop: asyncio.Event, producer: asyncio.Task[None]) -> bool:
        return (producer.done() or stop.is_set()) and not self.pending

    async def _stream(self, stop: asyncio.Event, producer: asyncio.Task[None]) -> None:
        backoff = BACKOFF_START_S
        unreachable = ""
        give_up_at: float | None = None
        async with secure_channel(self.cfg.core_address, self.cfg.tls) as core:
            self._sessions_stub = sessions_pb2_grpc.SessionsServiceStub(core)
            finisher = asyncio.create_task(self._until_done(stop, producer, core))
            try:
                while not self._done(stop, producer):
                    if (stop.is_set() or producer.done()) and give_up_at is None:
                        give_up_at = time.monotonic() + self.cfg.flush_timeout_s
                    if give_up_at is not None and time.monotonic() > give_up_at:
                        break
                    try:
                        assignment = await self._attach(unreachable)
                    except grpc.aio.AioRpcError as e:
                        if not self.session_id and e.code() in FATAL_OPEN_CODES:
                            raise
                        self.stats.core_failures += 1
                        log.log(
                            logging.ERROR
                            if backoff >= BACKOFF_CAP_S and give_up_at is None
                            else logging.INFO,
                            "core unreachable or refusing; retrying",
                            extra={
                                "code": e.code().name,
                                "detail": e.details(),
                                "retry_s": backoff,
                            },
                        )
                        backoff = await self._wait(stop, backoff, give_up_at)
                        continue
                    unreachable = ""
                    lost = await self._publish_on(assignment)
                    if lost is None:
                        break  # finished: everything archived, or the flush timed out
                    # The stream was lost: back to the core for where to go.
                    self.stats.reconnects += 1
                    if self._lost_at is None and self._last_ack:
                        self._lost_at = self._last_ack
                    if lost.acked:
                        backoff = BACKOFF_START_S
                    e2 = lost.error
                    code = e2.code() if e2 is not None else grpc.StatusCode.UNAVAILABLE
                    log.info(
                        "stream lost; asking the core again",
                        extra={
                            "session": self.session_id,
                            "edge": lost.edge_id,
                            "code": code.name,
                            "detail": e2.details() if e2 is not None else "stream ended",
                        },
                    )
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        # Refused for sending too fast: slow the catch-up down (never below
                        # what live data needs) and wait before trying again.
                        self.stats.rate_limited += 1
                        live = 1.0 / self.cfg.batch_interval_s
                        self._catchup_rate = max(1.5 * live, self._catchup_rate / 2)
                        backoff = max(backoff, RATE_LIMITED_BACKOFF_S)
                        backoff = await self._wait(stop, backoff, give_up_at)
                    elif code in EDGE_GONE_CODES and e2 is not None:
                        # The core checks the edge and re-places the session if it is gone;
                        # the first retry after losing an edge that was working goes at once.
                        unreachable = lost.edge_id
                        if not lost.acked:
                            backoff = await self._wait(stop, backoff, give_up_at)
                    elif code in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.UNAUTHENTICATED,
                    ):
                        # Moved away, or the token expired: a new Attach has the answer.
                        if not lost.acked:
                            backoff = await self._wait(stop, backoff, give_up_at)
                    else:
                        backoff = await self._wait(stop, backoff, give_up_at)
            finally:
                finisher.cancel()
                await asyncio.gather(finisher, return_exceptions=True)
        if self.pending:
            log.warning(
                "stopping before the archive confirmed every batch",
                extra={"session": self.session_id, "unarchived": self.pending},
            )

    async def _wait(self, stop: asyncio.Event, backoff: float, give_up_at: float | None) -> float:
        """Sleep a jittered backoff; return the next one. While stopping, retries are short
        (the flush has its own deadline); otherwise stop cuts the wait."""
        if give_up_at is None:
            return await wait_backoff(stop, backoff, BACKOFF_CAP_S)
        await asyncio.sleep(min(jittered(backoff), 0.5, max(0.0, give_up_at - time.monotonic())))
        return min(backoff * 2, BACKOFF_CAP_S)

    async def _publish_on(self, first: sessions_pb2.Assignment) -> _Lost | None:
        """Publish to the assigned edge, following moves make-before-break, until the stream
        is lost (returns how) or everything is done (None)."""
        current = self._open_stream(first)
        self.assignment = first
        self.stats.edges.append(first.edge_id)
        candidate: _Stream | None = None
        move_from: float | None = None  # a move is under way since then
        move_target = ""  # the edge the old edge said we move to, while no candidate is open
        move_retry_at = 0.0
        move_backoff = 0.2
        refresh_retry_s = 1.0
        refresh_at = time.monotonic() + self._refresh_due_in()
        any_acked = False
        promoted_from = ""  # the old edge, when the new stream took over before its first ack

        def handed_over(old_edge: str) -> None:
            nonlocal move_from, move_target, move_backoff, refresh_at
            self.assignment = current.assignment
            self.token = current.token
            self.token_expires_unix_ns = current.assignment.token_expires_unix_ns
            self._token_received_ns = time.time_ns()
            refresh_at = time.monotonic() + self._refresh_due_in()
            self.stats.edges.append(current.edge_id)
            self.stats.handovers += 1
            if move_from is not None:
                self.stats.handovers_s.append(time.monotonic() - move_from)
            log.info(
                "moved to a new edge",
                extra={"session": self.session_id, "from": old_edge, "to": current.edge_id},
            )
            move_from, move_target, move_backoff = None, "", 0.2

        try:
            while True:
                now = time.monotonic()
                due = refresh_at
                if move_target and candidate is None:
                    due = min(due, move_retry_at)
                try:
                    timeout = None if due == float("inf") else max(0.0, due - now)
                    note: _Note | None = await asyncio.wait_for(self._notes.get(), timeout)
                except TimeoutError:
                    note = None
                now = time.monotonic()
                if note is None:
                    if move_target and candidate is None and now >= move_retry_at:
                        candidate = await self._start_move(current)
                        if candidate is None:
                            move_retry_at = now + move_backoff
                            move_backoff = min(move_backoff * 2, 5.0)
                    if now >= refresh_at:
                        renewed = await self._refresh(current)
                        if renewed is False:
                            refresh_at = now + refresh_retry_s
                            refresh_retry_s = min(refresh_retry_s * 2, 30.0)
                        else:
                            refresh_retry_s = 1.0
                            refresh_at = now + self._refresh_due_in()
                            if isinstance(renewed, sessions_pb2.Assignment) and candidate is None:
                                # The session was placed elsewhere meanwhile: move there.
                                move_from = now
                                candidate = self._open_stream(renewed)
                    continue
                if isinstance(note, _Finished):
                    return None
                if isinstance(note, _Acked):
                    any_acked = True
                    if note.stream is candidate:
                        # The new edge has our data: now the old stream may go.
                        old, current, candidate = current, candidate, None
                        await self._close_stream(old)
                        handed_over(old.edge_id)
                    elif note.stream is current and promoted_from:
                        # The old edge let go before the new one's first ack (below).
                        handed_over(promoted_from)
                        promoted_from = ""
                    continue
                if isinstance(note, _Ended):
                    if note.stream is current:
                        await self._close_stream(current)
                        if candidate is not None:
                            # The old edge let go first (the core releases it once the new
                            # edge has a publisher): the new stream carries on, and its first
                            # ack completes the handover.
                            current, candidate = candidate, None
                            move_target = ""
                            if current.acked:
                                handed_over(note.stream.edge_id)
                            else:
                                promoted_from = note.stream.edge_id
                            continue
                        return _Lost(note.error, any_acked or current.acked, current.edge_id)
                    if note.stream is candidate:
                        log.info(
                            "new edge not ready; staying on the old one",
                            extra={
                                "session": self.session_id,
                                "edge": candidate.edge_id,
                                "code": note.error.code().name if note.error else "ended",
                            },
                        )
                        await self._close_stream(candidate)
                        candidate = None
                        move_target = move_target or "?"
                        move_retry_at = time.monotonic() + move_backoff
                        move_backoff = min(move_backoff * 2, 5.0)
                    continue
                if isinstance(note, _MoveTo):
                    if note.assignment.edge_id == current.edge_id:
                        continue
                    await self._close_stream(candidate)
                    move_from = note.asked_at
                    candidate = self._open_stream(note.assignment)
                    continue
                if isinstance(note, _Moving) and note.stream is current and candidate is None:
                    log.info(
                        "edge says the session is moving",
                        extra={
                            "session": self.session_id,
                            "to": note.new_edge_id,
                            "reason": note.reason,
                        },
                    )
                    move_from = move_from or time.monotonic()
                    move_target = note.new_edge_id or "?"
                    candidate = await self._start_move(current)
                    if candidate is None:
                        move_retry_at = time.monotonic() + move_backoff
        finally:
            await self._close_stream(candidate)
            await self._close_stream(current)

    async def _start_move(self, current: _Stream) -> _Stream | None:
        """Attach as publisher to learn the new edge, and open a stream to it (the old one
        goes on meanwhile). None when the core is not there yet; retried."""
        try:
            a = await self._attach()
        except grpc.aio.AioRpcError as e:
            self.stats.core_failures += 1
            log.info("core not answering during a move; retrying", extra={"code": e.code().name})
            return None
        if a.edge_id == current.edge_id:
            return None  # the core has not switched the session yet
        return self._open_stream(a)

    async def _refresh(self, current: _Stream) -> sessions_pb2.Assignment | bool:
        """Renew the token through the core; send it in-band on the open stream. Returns
        False when the core did not answer, an Assignment when the session is elsewhere now."""
        try:
            a = await self._attach()
        except grpc.aio.AioRpcError as e:
            self.stats.core_failures += 1
            log.warning(
                "token refresh failed; retrying",
                extra={"code": e.code().name, "detail": e.details()},
            )
            return False
        self.stats.token_refreshes += 1
        if a.edge_id != current.edge_id:
            return a
        current.refresh_token = a.token
        current.token = a.token
        current.wake.set()
        return True

    async def change_zone(self, zone: str) -> bool:
        """The device moved to another zone (a 5G handover): the core readies an edge there,
        then the stream moves to it make-before-break. Returns whether the session moved."""
        if self._sessions_stub is None:
            raise RuntimeError("the device has not reached the core yet")
        asked = time.monotonic()
        resp = await self._sessions_stub.ChangeZone(
            sessions_pb2.ChangeZoneRequest(session_id=self.session_id, zone=zone),
            metadata=bearer(self.token),
            timeout=5,
        )
        self.cfg.zone = zone
        if resp.moved:
            self._notes.put_nowait(_MoveTo(resp.assignment, asked))
        return bool(resp.moved)

    async def _until_done(
        self, stop: asyncio.Event, producer: asyncio.Task[None], core: grpc.aio.Channel
    ) -> None:
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({producer, stopped}, return_when="FIRST_COMPLETED")
        finally:
            stopped.cancel()
        # Wait for the edge to take what is in flight, then for the archive to hold it.
        deadline = time.monotonic() + self.cfg.flush_timeout_s
        last = self._next_seq - 1
        while self.received_seq < last and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        archive = archive_pb2_grpc.ArchiveServiceStub(core)
        while self.pending and time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                wm = await archive.GetWatermark(
                    archive_pb2.GetWatermarkRequest(session_id=self.session_id), timeout=2
                )
                self._archived(wm.watermark.archived_seq)
            if self.pending:
                await asyncio.sleep(0.1)
        self._notes.put_nowait(_Finished())


async def run_swarm(
    cfgs: Sequence[DeviceConfig], stop: asyncio.Event, duration_s: float = 0.0
) -> list[DeviceStats]:
    agents = [DeviceAgent(c) for c in cfgs]
    return await asyncio.gather(*(a.run(stop, duration_s) for a in agents))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="telehealth-device",
        description="Stream a simulated patient (vitals and ECG) through the mesh: opens a session "
        "at the core, publishes to the edge it is placed on, keeps every batch until the core's "
        "archive holds it, follows moves to other edges, and reconnects and resumes on any loss "
        "(it only exits on Ctrl-C, --duration, or when its session is closed).",
    )
    parser.add_argument("--core", default="127.0.0.1:50051", help="core gRPC address")
    parser.add_argument("--patient", default="patient-001", help="pseudonymous patient id")
    parser.add_argument("--zone", default="zone-a", help="zone (radio cell) the device is in")
    parser.add_argument(
        "--scenario",
        default="stable",
        choices=(*PatientSimulator.scenarios(), "mixed"),
        help="mixed: every third patient deteriorating, the rest stable",
    )
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument("--ecg-rate", type=float, default=250.0, help="ECG samples per second")
    parser.add_argument("--batch-ms", type=float, default=40.0, help="milliseconds per batch")
    parser.add_argument("--spo2-scale", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--deterioration-s", type=float, default=180.0, help="how fast 'deteriorating' worsens"
    )
    parser.add_argument("--patients", type=int, default=1, help="simulate this many patients")
    parser.add_argument(
        "--zones", default="", help="comma-separated zones to spread --patients over"
    )
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until Ctrl-C")
    parser.add_argument(
        "--max-backlog-mb",
        type=float,
        default=DEFAULT_MAX_BACKLOG_BYTES / 2**20,
        help="MiB of unarchived batches kept per patient while the mesh is unreachable "
        "(default: ~8 hours at the default rate); past it the oldest are dropped, logged as errors",
    )
    parser.add_argument(
        "--catchup-rate",
        type=float,
        default=DEFAULT_CATCHUP_RATE,
        help="batches/s a backlog is resent at after an outage (keep below the edge's "
        "publish_rate_batches_per_s)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--video",
        default="",
        metavar="camera[:N]|file:PATH|synthetic[:BPM]",
        help="also send video and audio to the edge (synthetic: a face pulsing at BPM)",
    )
    add_tls_flags(parser)
    ns = parser.parse_args(argv)
    if ns.patients < 1:
        parser.error("--patients must be at least 1")
    if not 1 <= ns.batch_ms <= 10_000:
        parser.error("--batch-ms must be between 1 and 10000")
    if ns.max_backlog_mb <= 0:
        parser.error("--max-backlog-mb must be positive")
    if ns.catchup_rate * ns.batch_ms / 1000 <= 1:
        parser.error("--catchup-rate must be above the live rate (1000 / --batch-ms batches/s)")
    configure_logging("device", ns.log_level.upper(), "json")
    tls = tls_from_flags(parser, ns)
    zones = [z for z in ns.zones.split(",") if z] or [ns.zone]
    cfgs = [
        DeviceConfig(
            core_address=ns.core,
            patient_id=ns.patient if ns.patients == 1 else f"{ns.patient}-{i + 1:03d}",
            zone=zones[i % len(zones)],
            scenario=ns.scenario
            if ns.scenario != "mixed"
            else ("deteriorating" if i % 3 == 2 else "stable"),
            seed=ns.seed + i,
            ecg_rate_hz=ns.ecg_rate,
            batch_interval_s=ns.batch_ms / 1000,
            spo2_scale=ns.spo2_scale,
            deterioration_s=ns.deterioration_s,
            tls=tls,
            max_backlog_bytes=int(ns.max_backlog_mb * 2**20),
            catchup_rate_batches_per_s=ns.catchup_rate,
        )
        for i in range(ns.patients)
    ]

    async def go() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        if ns.video:
            from clients.video import run_with_video

            await run_with_video([DeviceAgent(c) for c in cfgs], ns.video, stop, ns.duration)
            return
        await run_swarm(cfgs, stop, ns.duration)

    try:
        asyncio.run(go())
    except grpc.aio.AioRpcError as e:
        print(f"telehealth-device: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
