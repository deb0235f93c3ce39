"""The load generator process: an open-loop swarm of patients and viewers against one path.

Run by the runner as `python -m loadtest.generator SPEC.json OUT.json`, pinned to its own CPU.
Every batch has a scheduled send time on the clock; senders never wait for acks, and latency
is the subscriber's receipt time minus that scheduled time, so a stalled system shows up as
latency instead of silently slowing the load (no coordinated omission). A batch the generator
could not send before sending stopped, or that was sent but never arrived, still counts: its
latency is recorded as a lower bound (time it was given up on minus its scheduled time), and
percentiles those samples reach are marked as lower bounds. Both ends live in this process, so
one monotonic clock (perf_counter_ns) times everything; wall time (time_ns) only fills the
batches' device timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.recording import (
    EXPIRE_S,
    HIST_MAX_US,
    NEW,
    TOO_OLD,
    Patient,
    SeenWindow,
    Segment,
    StepRecorder,
    memory_growth,
)
from telehealth.runtime import settle_heap

__all__ = ["HIST_MAX_US", "GeneratorSpec", "Patient", "StepRecorder", "StepSpec", "Swarm"]

# Longest wait for late deliveries after the last send while they are still arriving.
DRAIN_MAX_S = 10.0
# A generator is the bottleneck ("generator-bound") when it used this much of its CPU ...
GENERATOR_BOUND_CPU = 85.0
# ... or its event loop ran a 10 ms timer this late at p99: deliveries then wait to be
# timestamped and sends to be written, and the figure is the generator's, not the system's.
GENERATOR_BOUND_LOOP_LAG_MS = 5.0
LOOP_LAG_SHARE = 0.1
LOOP_PROBE_S = 0.010
# The edge's responsiveness: a health check this often during a step, given up after this.
HEALTH_PROBE_S = 0.1
HEALTH_TIMEOUT_S = 5.0
# After the send window's end, a write still blocked this long is abandoned (its stream reset).
WRITE_GRACE_S = 1.0


@dataclass
class StepSpec:
    patients: int
    duration_s: float
    ramp_s: float = 0.0
    retry: bool = False


@dataclass
class GeneratorSpec:
    label: str
    path: str
    target: str
    batch_rate_hz: float
    ecg_hz: float
    vitals_rate_hz: float
    steps: list[StepSpec]
    viewers: int
    watched: int
    connections: int = 8
    drain_s: float = 3.0
    zone: str = "zone-a"
    edge_metrics_url: str = ""
    # The local core's key ring, to mint viewer tokens when Attach needs a clinician login.
    viewer_key_dir: str = ""
    # Lifetime of those minted viewer tokens (a view whose token expires attaches again).
    viewer_token_ttl_s: int = 3600
    pids: dict[str, int] = field(default_factory=dict)
    cpus: list[int] = field(default_factory=list)
    # The system under test's CPUs (to see what else ran on them).
    sut_cpus: list[int] = field(default_factory=list)
    progress: str = "lines"
    run_id: str = "run"
    # Saturation search: after the steps, bisect between the last passing and first failing.
    p99_limit_ms: float = 0.0
    bisect_steps: int = 0
    stop_after_failures: int = 0
    retry_failures: bool = False
    # Deliveries later than this count as `late` (the scenario's p99 limit, or 50 ms).
    late_ms: float = 50.0
    # Two-way video calls through the edge alongside the vitals (edge path only).
    video_calls: int = 0

    @property
    def max_patients(self) -> int:
        return max(s.patients for s in self.steps)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> GeneratorSpec:
        d = dict(d)
        d["steps"] = [StepSpec(**s) for s in d["steps"]]
        return GeneratorSpec(**d)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["steps"] = [s.__dict__ for s in self.steps]
        return out


class Swarm:
    """Common bookkeeping; one subclass per path knows how to connect, send and subscribe.

    `clock` and `sleep` are the monotonic clock (ns) and the timer; tests replace them with
    a virtual clock to check the send schedule and the deadline path without a network.
    """

    clock: Callable[[], int] = staticmethod(time.perf_counter_ns)
    sleep: Callable[[float], Awaitable[None]] = staticmethod(asyncio.sleep)

    def __init__(self, spec: GeneratorSpec) -> None:
        from loadtest.payload import PayloadBook, PayloadShape

        self.spec = spec
        self.book = PayloadBook(PayloadShape(spec.batch_rate_hz, spec.ecg_hz, spec.vitals_rate_hz))
        self.patients: list[Patient] = []
        self.drops = 0
        self.stray = 0
        # Arrivals of batches whose step was already counted (later than its drain).
        self.after_drain = 0
        self.errors: dict[str, int] = {}
        self.current: StepRecorder | None = None
        self.deadline_ns = 0
        # MQTT deliveries come from paho's threads: receive windows change under this lock.
        self.seen_lock = threading.Lock()
        # The receive window per viewer, in seqs: EXPIRE_S of batches.
        self.window = max(64, math.ceil(EXPIRE_S * spec.batch_rate_hz))

    # -- per path ------------------------------------------------------------------------
    async def setup(self) -> None: ...
    async def open_streams(self, n: int) -> None: ...
    async def send(self, p: Patient, data: bytes) -> None: ...
    def reset_stream(self, p: Patient) -> None:
        """Drop a patient's stream whose write was abandoned; open_streams makes a new one."""

    async def subscribers_ready(self) -> int:
        return -1

    async def read_drops(self) -> int:
        return self.drops

    async def server_counters(self) -> dict[str, float]:
        """What the system under test says about itself (scraped, read-only), if it can."""
        return {}

    async def probe_server(self, rec: StepRecorder) -> None:
        """Time health checks on the system under test until cancelled (gRPC servers only)."""

    async def close(self) -> None: ...

    def note_error(self, what: str, e: BaseException) -> None:
        """Count stream failures; say the first of each kind, since they explain a loss."""
        key = f"{what}: {type(e).__name__}"
        if type(e).__module__.startswith("grpc"):
            import grpc

            if isinstance(e, grpc.aio.AioRpcError):
                if e.code() == grpc.StatusCode.CANCELLED:
                    return  # our own cancel (end of run, or an abandoned write)
                key = f"{what}: {e.code().name}: {e.details()}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if self.errors[key] == 1:
            print(f"[{self.spec.label}] {key}", file=sys.stderr, flush=True)

    # -- shared ---------------------------------------------------------------------------
    def new_patient(self, index: int, session_id: str, **kw: Any) -> Patient:
        """The first `watched` patients have viewers (a ward clinician watches some)."""
        return Patient(
            index,
            session_id,
            watched=index < self.spec.watched,
            seen=[SeenWindow() for _ in range(self.spec.viewers)],
            **kw,
        )

    def deliver(self, patient: int, viewer: int, seq: int, now_ns: int) -> None:
        with self.seen_lock:
            self._deliver(patient, viewer, seq, now_ns)

    def _deliver(self, patient: int, viewer: int, seq: int, now_ns: int) -> None:
        p = self.patients[patient] if 0 <= patient < len(self.patients) else None
        seg = p.segment_of(seq) if p is not None else None
        if p is None or seg is None or not 0 <= viewer < len(p.seen):
            self.stray += 1
            return
        rec = seg.rec
        w = p.seen[viewer]
        mark = w.mark(seq)
        if mark == TOO_OLD:
            # Counted undelivered when the window passed it; a delivery now changes nothing.
            self.after_drain += 1
            return
        if mark != NEW:
            with rec.lock:
                rec.duplicates += 1
            return
        if seg.closed:
            self.after_drain += 1
            return
        rec.on_delivered(seg.due(seq), now_ns)
        if seq - w.base >= 2 * self.window:
            self._expire(p, w, seq - self.window, now_ns)

    def _expire(self, p: Patient, w: SeenWindow, new_base: int, now_ns: int) -> None:
        """Give up on seqs more than EXPIRE_S behind: undelivered now (latency >= EXPIRE_S)."""
        for seq in w.advance(new_base):
            seg = p.segment_of(seq)
            if seg is not None and not seg.closed:
                seg.rec.on_undelivered(seg.due(seq), now_ns, expired=True)

    async def run_step(self, rec: StepRecorder, step: StepSpec) -> None:
        period_ns = round(1e9 / self.spec.batch_rate_hz)
        n = step.patients
        end_ns = rec.t0_ns + int(step.duration_s * 1e9)
        # Every batch scheduled before the end is sent, however late, until this hard limit.
        self.deadline_ns = end_ns + int(max(self.spec.drain_s, 1.0) * 1e9)
        tasks = []
        for i in range(n):
            p = self.patients[i]
            # Devices are not synchronised: spread their phases over one period, and over
            # the ramp when patients join gradually.
            start = rec.t0_ns + int(step.ramp_s * 1e9 * i / n) + period_ns * i // n
            count = max(0, math.ceil((end_ns - start) / period_ns))
            rec.scheduled += count
            seg = Segment(p.next_seq, start, period_ns, count, rec)
            p.segments.append(seg)
            tasks.append(asyncio.create_task(self._send_loop(p, seg)))
        if not tasks:
            return
        # A write blocked past the deadline (the server stopped reading) is abandoned: the
        # rest of that patient's batches are not sent, and count as such.
        grace_s = (self.deadline_ns - self.clock()) / 1e9 + WRITE_GRACE_S

        async def watchdog() -> None:
            await self.sleep(max(grace_s, 0.0))
            for t in tasks:
                t.cancel()

        wd = asyncio.create_task(watchdog())
        await asyncio.gather(*tasks, return_exceptions=True)
        wd.cancel()
        await asyncio.gather(wd, return_exceptions=True)
        rec.send_end_ns = self.clock()

    async def _send_loop(self, p: Patient, seg: Segment) -> None:
        rec = seg.rec
        viewers = self.spec.viewers if p.watched else 0
        clock = self.clock
        k = 0
        try:
            while k < seg.count:
                due = seg.start_ns + k * seg.period_ns
                delay = due - clock()
                if delay > 0:
                    await self.sleep(delay / 1e9)
                if clock() > self.deadline_ns:
                    break
                seq = p.next_seq
                p.next_seq += 1
                if p.t0_unix_ns == 0:
                    p.t0_unix_ns = time.time_ns()
                data = self.book.encode(p.index, p.session_id, seq, p.t0_unix_ns, time.time_ns())
                # Counted before the write: time blocked in the write counts as latency.
                seg.sent += 1
                rec.on_sent(due, viewers, clock())
                k += 1
                await self.send(p, data)
        except asyncio.CancelledError:
            self.reset_stream(p)
            raise
        except Exception as e:
            # A broken stream: the rest of this step's batches are not sent (and count so);
            # the next step opens a new stream.
            self.note_error("publish", e)
            self.reset_stream(p)
        finally:
            if k < seg.count:
                dues = seg.start_ns + np.arange(k, seg.count, dtype=np.int64) * seg.period_ns
                rec.on_unsent(dues, viewers, max(clock(), self.deadline_ns))

    async def wait_delivered(self, rec: StepRecorder) -> None:
        """Wait for late deliveries: at least drain_s, longer while they keep arriving (an
        overloaded server is still working off its queue), never past DRAIN_MAX_S."""
        start = time.monotonic()
        last_progress, last_count = start, rec.delivered
        while rec.delivered + rec.expired < rec.expected:
            now = time.monotonic()
            if rec.delivered != last_count:
                last_progress, last_count = now, rec.delivered
            if now - start > max(DRAIN_MAX_S, self.spec.drain_s):
                return
            if now - start > self.spec.drain_s and now - last_progress > 1.0:
                return
            await asyncio.sleep(0.05)

    def finish_step(self, rec: StepRecorder, now_ns: int) -> None:
        """The drain is over: every (batch, viewer) of the step not received is undelivered,
        recorded at now - scheduled (a lower bound); later arrivals no longer count."""
        with self.seen_lock:
            self._finish_step(rec, now_ns)
        rec.close()

    def _finish_step(self, rec: StepRecorder, now_ns: int) -> None:
        for p in self.patients:
            for seg in p.segments:
                if seg.rec is not rec or seg.closed:
                    continue
                seg.closed = True
                if not p.watched:
                    continue
                hi = seg.first_seq + seg.sent
                for w in p.seen:
                    for seq in range(max(seg.first_seq, w.base), hi):
                        if not w.has(seq):
                            rec.on_undelivered(seg.due(seq), now_ns)


async def probe_loop_lag(rec_of: Callable[[], StepRecorder | None], stop: asyncio.Event) -> None:
    """How late this process's event loop runs a short timer: the generator's own delay."""
    clock = time.perf_counter_ns
    period_ns = int(LOOP_PROBE_S * 1e9)
    while not stop.is_set():
        t = clock()
        await asyncio.sleep(LOOP_PROBE_S)
        rec = rec_of()
        if rec is not None:
            rec.loop_lag.add(min(max(1, (clock() - t - period_ns) // 1000), HIST_MAX_US))


def scrape_metrics(url: str) -> dict[str, float]:
    """The edge's own counters from its /metrics (read-only): per sample name, summed over
    labels, with the `result` label kept (batches in: accepted, duplicate, rejected).
    Histogram buckets are skipped; any metric with loop_lag in its name is kept whole."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            if not (s.name.startswith("telehealth_edge_") or "loop_lag" in s.name):
                continue
            key = s.name + (f"{{result={s.labels['result']}}}" if "result" in s.labels else "")
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


# ----------------------------------------------------------------------------------------
# gRPC paths: the edge (through the core's placement) and the bare echo
# ----------------------------------------------------------------------------------------


class _GrpcSwarm(Swarm):
    publish_method = ""
    subscribe_method = ""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.channels: list[Any] = []
        self.publish_calls: dict[int, Any] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.acks = 0
        self.renewals = 0  # tokens renewed during the run (publishers and viewers)
        self.viewer_renewals = 0  # of those, views that attached again after expiry

    def _pool(self, address: str) -> None:
        import grpc

        from telehealth.rpc import channel_options

        self.channels = [
            grpc.aio.insecure_channel(address, options=[*channel_options(), ("grpc.channel_id", i)])
            for i in range(self.spec.connections)
        ]

    def channel_for(self, p: Patient) -> Any:
        return self.channels[p.index % len(self.channels)]

    def publish_metadata(self, p: Patient) -> tuple[tuple[str, str], ...]:
        raise NotImplementedError

    def subscribe_request(
        self, p: Patient, resume_after: int = 0
    ) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        raise NotImplementedError

    async def renew_viewer(self, p: Patient) -> bool:
        """A fresh viewer token for p after the edge ended a view whose token expired;
        False where the peer has no tokens (the view is then over)."""
        return False

    def seq_of(self, raw: bytes) -> tuple[int, int]:
        """(seq of the batch or 0, events the server said it dropped)."""
        raise NotImplementedError

    async def open_streams(self, n: int) -> None:
        for p in self.patients[:n]:
            if p.index in self.publish_calls:
                continue
            call = self.channel_for(p).stream_stream(
                self.publish_method, request_serializer=None, response_deserializer=None
            )(metadata=self.publish_metadata(p))
            self.publish_calls[p.index] = call
            self.tasks.append(asyncio.create_task(self._read_acks(call)))

    async def _read_acks(self, call: Any) -> None:
        try:
            async for _ in call:
                self.acks += 1
        except Exception as e:
            self.note_error("publish", e)

    async def subscribe_all(self) -> None:
        for p in self.patients:
            if not p.watched:
                continue
            for v in range(self.spec.viewers):
                self.tasks.append(asyncio.create_task(self._read_subscription(p, v)))

    def _subscribe(self, p: Patient, resume_after: int) -> Any:
        req, md = self.subscribe_request(p, resume_after)
        return self.channel_for(p).unary_stream(
            self.subscribe_method, request_serializer=None, response_deserializer=None
        )(req, metadata=md)

    async def _read_subscription(self, p: Patient, viewer: int) -> None:
        import grpc

        clock = time.perf_counter_ns
        last = 0
        call = self._subscribe(p, 0)
        while True:
            try:
                async for raw in call:
                    now = clock()
                    seq, dropped = self.seq_of(raw)
                    if dropped:
                        self.drops += dropped
                    if seq:
                        last = max(last, seq)
                        self.deliver(p.index, viewer, seq, now)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                    self.note_error("subscribe", e)
                    return
                expired = e
            except Exception as e:
                self.note_error("subscribe", e)
                return
            # The view's token expired (a long run): attach again and resume after the last
            # seq seen, as a clinician's viewer does; the edge replays the rest.
            try:
                renewed = await self.renew_viewer(p)
            except Exception as e:
                self.note_error("viewer token renewal", e)
                return
            if not renewed:
                self.note_error("subscribe", expired)
                return
            self.renewals += 1
            self.viewer_renewals += 1
            call = self._subscribe(p, last)

    async def send(self, p: Patient, data: bytes) -> None:
        from loadtest.payload import wrap_publish

        await self.publish_calls[p.index].write(wrap_publish(data))

    def reset_stream(self, p: Patient) -> None:
        call = self.publish_calls.pop(p.index, None)
        if call is not None:
            call.cancel()

    async def close(self) -> None:
        for call in self.publish_calls.values():
            call.cancel()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ch in self.channels:
            await ch.close()


class EdgeSwarm(_GrpcSwarm):
    """device -> edge -> subscriber: sessions opened at the core, tokens from the core."""

    publish_method = "/telehealth.v1.VitalsService/Publish"
    subscribe_method = "/telehealth.v1.VitalsService/Subscribe"

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.viewer_tokens = ""
        self._issuer: Any = None
        self.edge_address = ""
        self.opened: dict[int, Any] = {}  # patient index -> OpenSessionResponse

    async def setup(self) -> None:
        import grpc

        from telehealth.rpc import channel_options
        from telehealth.v1 import sessions_pb2, sessions_pb2_grpc

        self.core = grpc.aio.insecure_channel(self.spec.target, options=channel_options())
        stub = sessions_pb2_grpc.SessionsServiceStub(self.core)
        n = self.spec.max_patients
        edge_addresses: set[str] = set()

        async def open_one(i: int) -> Patient:
            r = await stub.Open(
                sessions_pb2.OpenSessionRequest(
                    patient_id=f"lt-{self.spec.run_id}-{i:05d}", zone=self.spec.zone
                ),
                timeout=30,
            )
            p = self.new_patient(i, r.session.session_id, publisher_token=r.assignment.token)
            self.opened[i] = r
            edge_addresses.add(r.assignment.edge_address)
            # Video calls need a clinician's token too, watched for vitals or not.
            if i < max(self.spec.watched, self.spec.video_calls):
                p.viewer_token = await self._viewer_token(stub, r)
            return p

        for lo in range(0, n, 50):  # bounded concurrency: the core serialises placement anyway
            self.patients.extend(
                await asyncio.gather(*(open_one(i) for i in range(lo, min(n, lo + 50))))
            )
        if len(edge_addresses) != 1:
            # Loss and latency are per edge; several edges would blur what is measured.
            print(
                f"[{self.spec.label}] note: sessions placed on {len(edge_addresses)} edges",
                file=sys.stderr,
            )
        self.edge_address = sorted(edge_addresses)[0]
        self._pool(self.edge_address)
        self.stub = stub
        self.tasks.append(asyncio.create_task(self.renew_publishers()))

    async def _viewer_token(self, stub: Any, opened: Any) -> str:
        """A viewer token from Attach; when the core wants a clinician login (which has no
        provisioning API yet), one minted with the local core's own key ring instead."""
        import grpc

        from telehealth.v1 import sessions_pb2

        if self.viewer_tokens != "minted":
            try:
                a = await stub.Attach(
                    sessions_pb2.AttachSessionRequest(
                        session_id=opened.session.session_id, role=sessions_pb2.ROLE_VIEWER
                    ),
                    timeout=30,
                )
                self.viewer_tokens = "attach"
                return str(a.assignment.token)
            except grpc.aio.AioRpcError as e:
                refused = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                if e.code() not in refused or not self.spec.viewer_key_dir:
                    raise
        from telehealth.security.tokens import KeyRing, TokenIssuer

        if self._issuer is None:
            key_dir = Path(self.spec.viewer_key_dir)
            # Setup phase, a few small files once: blocking reads are fine here.
            if not key_dir.is_dir():  # noqa: ASYNC240
                raise RuntimeError(f"no core key ring at {key_dir} to mint viewer tokens")
            self._issuer = TokenIssuer(
                KeyRing.load_or_create(key_dir), self.spec.viewer_token_ttl_s
            )
        self.viewer_tokens = "minted"
        token, _ = self._issuer.issue(
            session_id=opened.session.session_id,
            role="viewer",
            edge_id=opened.assignment.edge_id,
            zone=opened.session.zone,
            spo2_scale=int(opened.session.spo2_scale) or 1,
            subject_id="loadtest-clinician",
        )
        return str(token)

    def publish_metadata(self, p: Patient) -> tuple[tuple[str, str], ...]:
        from telehealth.rpc import bearer

        return bearer(p.publisher_token)

    def subscribe_request(
        self, p: Patient, resume_after: int = 0
    ) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        from telehealth.rpc import bearer
        from telehealth.v1 import vitals_pb2

        req = vitals_pb2.SubscribeVitalsRequest(
            session_id=p.session_id, resume_after_seq=resume_after
        ).SerializeToString()
        return req, bearer(p.viewer_token)

    async def renew_viewer(self, p: Patient) -> bool:
        p.viewer_token = await self._viewer_token(self.stub, self.opened[p.index])
        return True

    async def send(self, p: Patient, data: bytes) -> None:
        from loadtest.payload import wrap_publish
        from telehealth.rpc import with_refresh_token

        msg = wrap_publish(data)
        if p.refresh_token:
            msg = with_refresh_token(msg, p.refresh_token)
            p.refresh_token = ""
        await self.publish_calls[p.index].write(msg)

    async def renew_publishers(self) -> None:
        """Publisher tokens last token_ttl_s (15 min by default): before a third of that is
        left, each patient attaches again and sends the new token in-band with its next
        batch, as the device agent does, so a soak longer than a token runs on."""
        import grpc
        import jwt

        from telehealth.rpc import bearer
        from telehealth.v1 import sessions_pb2

        def expiry(token: str) -> tuple[float, float]:
            c = jwt.decode(token, options={"verify_signature": False})
            return float(c["iat"]), float(c["exp"])

        while True:
            due = []
            for p in self.patients:
                iat, exp = expiry(p.publisher_token)
                due.append((exp - (exp - iat) / 3, p))
            first = min(t for t, _ in due)
            await asyncio.sleep(max(1.0, first - time.time()))
            for t, p in due:
                if t > time.time():
                    continue
                try:
                    a = await self.stub.Attach(
                        sessions_pb2.AttachSessionRequest(
                            session_id=p.session_id, role=sessions_pb2.ROLE_PUBLISHER
                        ),
                        metadata=bearer(p.publisher_token),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as e:
                    self.note_error("token renewal", e)
                    continue
                p.publisher_token = p.refresh_token = a.assignment.token
                self.renewals += 1

    def seq_of(self, raw: bytes) -> tuple[int, int]:
        from telehealth.v1 import vitals_pb2

        ev = vitals_pb2.SubscribeVitalsResponse.FromString(raw)
        kind = ev.WhichOneof("event")
        if kind == "batch":
            return ev.batch.seq, 0
        if kind == "gap":
            return 0, ev.gap.dropped_events
        return 0, 0  # NEWS2, alerts, derived heart rate: the edge's extra work, not counted

    async def subscribers_ready(self) -> int:
        if not self.spec.edge_metrics_url:
            return -1
        m = await asyncio.to_thread(scrape_metrics, self.spec.edge_metrics_url)
        return int(m.get("telehealth_edge_subscribers", -1))

    async def server_counters(self) -> dict[str, float]:
        if not self.spec.edge_metrics_url:
            return {}
        try:
            return await asyncio.to_thread(scrape_metrics, self.spec.edge_metrics_url)
        except OSError as e:
            self.note_error("metrics scrape", e)
            return {}

    async def probe_server(self, rec: StepRecorder) -> None:
        """Every HEALTH_PROBE_S a grpc.health.v1 Check on the edge, on a connection of its
        own (so the vitals streams' flow control does not hold it up): the edge's event loop
        answers it, so its round trip shows how responsive the edge is under the load."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from telehealth.rpc import channel_options

        async with grpc.aio.insecure_channel(
            self.edge_address, options=[*channel_options(), ("grpc.channel_id", -1)]
        ) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            clock = time.perf_counter_ns
            while True:
                t = clock()
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
                    rec.server_rtt.add(max(1, (clock() - t) // 1000))
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
                    rec.server_rtt_timeouts += 1
                    rec.server_rtt.add(int(HEALTH_TIMEOUT_S * 1e6))
                await asyncio.sleep(HEALTH_PROBE_S)

    async def close(self) -> None:
        from telehealth.v1 import sessions_pb2

        await super().close()
        # Closing frees the edge's capacity for the next run on the same mesh.
        for lo in range(0, len(self.patients), 50):
            await asyncio.gather(
                *(
                    self.stub.Close(
                        sessions_pb2.CloseSessionRequest(session_id=p.session_id),
                        metadata=self.publish_metadata(p),
                        timeout=10,
                    )
                    for p in self.patients[lo : lo + 50]
                ),
                return_exceptions=True,
            )
        await self.core.close()


class EchoSwarm(_GrpcSwarm):
    """device -> bare grpc.aio relay -> subscriber: the ceiling of the stack."""

    async def setup(self) -> None:
        from loadtest.peers import echo

        self.publish_method = echo.PUBLISH
        self.subscribe_method = echo.SUBSCRIBE
        self.patients = [
            self.new_patient(i, f"echo-{i:05d}") for i in range(self.spec.max_patients)
        ]
        self._pool(self.spec.target)
        self._stats = self.channels[0].unary_unary(
            echo.STATS, request_serializer=None, response_deserializer=None
        )
        self._drops0 = int(json.loads(await self._stats(b"", timeout=5))["dropped"])

    def publish_metadata(self, p: Patient) -> tuple[tuple[str, str], ...]:
        from loadtest.peers.echo import SESSION_HEADER

        return ((SESSION_HEADER, p.session_id),)

    def subscribe_request(
        self, p: Patient, resume_after: int = 0
    ) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        return p.session_id.encode(), ()

    def seq_of(self, raw: bytes) -> tuple[int, int]:
        from telehealth.v1 import vitals_pb2

        return vitals_pb2.PublishVitalsRequest.FromString(raw).batch.seq, 0

    async def subscribers_ready(self) -> int:
        return int(json.loads(await self._stats(b"", timeout=5))["subscribers"])

    async def read_drops(self) -> int:
        return int(json.loads(await self._stats(b"", timeout=5))["dropped"]) - self._drops0


# ----------------------------------------------------------------------------------------
# MQTT: Python clients through Mosquitto, QoS 0 or 1
# ----------------------------------------------------------------------------------------


class MqttSwarm(Swarm):
    """device -> Mosquitto -> subscriber with paho-mqtt clients (each with its network thread).

    Patients share `connections` publisher clients; viewers share at least as many
    subscriber clients, a patient's viewers always on distinct clients, one topic per patient.
    """

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__(spec)
        self.qos = 1 if spec.path.endswith("qos1") else 0
        host, _, port = spec.target.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.publishers: list[Any] = []
        self.subscribers: list[Any] = []
        self.subscribed = 0
        self.sys_dropped = -1
        self._cond = threading.Condition()

    def _client(self, name: str) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"lt-{self.spec.run_id}-{self.spec.label}-{name}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        # Default paho windows (20 in flight) would throttle QoS 1 below the offered rate
        # and turn the test into a closed loop; the broker keeps its own defaults.
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        return c

    def _connect(self, c: Any, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; paho refuses subscribes until CONNACK."""
        connected = threading.Event()
        previous = c.on_connect

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            connected.set()
            if previous is not None:
                previous(client, userdata, flags, reason, props)

        c.on_connect = on_connect
        c.connect(self.host, self.port, keepalive=30)
        c.loop_start()
        if not connected.wait(timeout_s):
            raise TimeoutError(f"no CONNACK from the MQTT broker at {self.host}:{self.port}")

    def topic(self, p: int) -> str:
        return f"lt/{self.spec.run_id}/{self.spec.label}/p{p}"

    async def setup(self) -> None:
        self.patients = [
            self.new_patient(i, f"mqtt-{i:05d}") for i in range(self.spec.max_patients)
        ]
        n_sub = max(self.spec.connections, self.spec.viewers)
        for i in range(self.spec.connections):
            c = self._client(f"pub{i}")
            self._connect(c)
            self.publishers.append(c)
        prefix = f"lt/{self.spec.run_id}/{self.spec.label}/p"
        qos = self.qos

        def on_message(client: Any, userdata: int, msg: Any) -> None:
            now = time.perf_counter_ns()
            from telehealth.v1 import vitals_pb2

            patient = int(msg.topic[len(prefix) :])
            seq = vitals_pb2.VitalsBatch.FromString(msg.payload).seq
            self.deliver(patient, userdata, seq, now)

        def on_subscribe(client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
            with self._cond:
                self.subscribed += len(codes)
                self._cond.notify_all()

        wanted: list[list[tuple[str, int]]] = [[] for _ in range(n_sub)]
        for p in self.patients:
            if p.watched:
                for v in range(self.spec.viewers):
                    wanted[(p.index + v) % n_sub].append((self.topic(p.index), qos))
        self.want_subs = sum(len(w) for w in wanted)
        for i in range(n_sub):
            c = self._client(f"sub{i}")
            c.user_data_set(i)
            c.on_message = on_message
            c.on_subscribe = on_subscribe
            self._connect(c)
            for lo in range(0, len(wanted[i]), 100):
                c.subscribe(wanted[i][lo : lo + 100])
            self.subscribers.append(c)
        # Mosquitto's own count of messages it dropped (queue limits), from $SYS.
        mon = self._client("sys")

        def on_sys(client: Any, userdata: Any, msg: Any) -> None:
            with contextlib.suppress(ValueError):
                self.sys_dropped = int(msg.payload)

        mon.on_message = on_sys
        self._connect(mon)
        mon.subscribe("$SYS/broker/publish/messages/dropped", 0)
        self.monitor = mon

    def viewer_slot(self, patient: int, client_index: int) -> int:
        n_sub = max(self.spec.connections, self.spec.viewers)
        return (client_index - patient) % n_sub

    def deliver(self, patient: int, viewer: int, seq: int, now_ns: int) -> None:
        # `viewer` arrives as the subscriber client's index; map it to the patient's viewer slot.
        super().deliver(patient, self.viewer_slot(patient, viewer), seq, now_ns)

    async def open_streams(self, n: int) -> None:
        return None

    async def subscribers_ready(self) -> int:
        with self._cond:
            return self.subscribed

    async def send(self, p: Patient, data: bytes) -> None:
        self.publishers[p.index % len(self.publishers)].publish(
            self.topic(p.index), data, qos=self.qos
        )

    async def read_drops(self) -> int:
        return max(0, self.sys_dropped)

    async def close(self) -> None:
        for c in [*self.publishers, *self.subscribers, self.monitor]:
            with contextlib.suppress(Exception):
                c.disconnect()
                c.loop_stop()


SWARMS: dict[str, Callable[[GeneratorSpec], Swarm]] = {
    "edge": EdgeSwarm,
    "echo": EchoSwarm,
    "mqtt-qos0": MqttSwarm,
    "mqtt-qos1": MqttSwarm,
}


# ----------------------------------------------------------------------------------------
# Progress and results
# ----------------------------------------------------------------------------------------


class Progress:
    """One line a second on stderr: overwritten on a terminal, every 5 s into a log."""

    def __init__(self, label: str, mode: str) -> None:
        self.label = label
        self.mode = mode
        self.tty = mode == "tty" and sys.stderr.isatty()

    async def run(self, swarm: Swarm, rec: StepRecorder, duration_s: float) -> None:
        last_sent = last_delivered = 0
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if self.mode == "off":
                continue
            sent, delivered = rec.sent, rec.delivered
            with rec.lock:
                p99 = rec.hist.value_at_ms(99.0)
            lag = rec.loop_lag.value_at_ms(99.0)
            elapsed = (time.perf_counter_ns() - rec.t0_ns) / 1e9
            line = (
                f"[{self.label} step {rec.index + 1}: {rec.patients} patients] "
                f"{min(elapsed, 9999):6.1f}s/{duration_s:g}s  "
                f"offered {sent - last_sent:6d}/s (target {rec.target_rate:g})  "
                f"delivered {delivered - last_delivered:6d}/s  p99 {p99:8.2f} ms  "
                f"late {rec.late}  drops {swarm.drops}  "
                f"not yet delivered {max(0, rec.expected - delivered)}  "
                f"generator loop lag p99 {lag:.1f} ms"
            )
            last_sent, last_delivered = sent, delivered
            if self.tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            elif ticks % 5 == 0:
                print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


CDF_POINTS = (*range(0, 100, 2), 99, 99.5, 99.9, 99.95, 99.99, 100)


def generator_bound(
    cpu_percent: float, loop_lag_p99_ms: float, latency_p99_ms: float = 0.0
) -> dict[str, Any]:
    """Was the generator, not the system under test, the limit of this step?

    Its CPU near full; or its loop lag both over the bound and a material share (a tenth) of
    the p99 measured: an overloaded server's bursts of late deliveries also delay the loop,
    but a 20 ms lag does not explain a p99 of seconds."""
    reasons = []
    if cpu_percent >= GENERATOR_BOUND_CPU:
        reasons.append(f"generator CPU {cpu_percent:.0f}% >= {GENERATOR_BOUND_CPU:.0f}%")
    material = latency_p99_ms <= 0 or loop_lag_p99_ms > LOOP_LAG_SHARE * latency_p99_ms
    if loop_lag_p99_ms > GENERATOR_BOUND_LOOP_LAG_MS and material:
        why = (
            f" with its CPU at only {cpu_percent:.0f}%: other processes on its CPU"
            if cpu_percent < 50
            else ""
        )
        reasons.append(
            f"generator loop lag p99 {loop_lag_p99_ms:.1f} ms > "
            f"{GENERATOR_BOUND_LOOP_LAG_MS:g} ms{why}"
        )
    return {
        "bound": bool(reasons),
        "reasons": reasons,
        "cpu_percent": cpu_percent,
        "loop_lag_p99_ms": loop_lag_p99_ms,
    }


def server_figures(
    sent: int, before: dict[str, float], at_send_end: dict[str, float], after: dict[str, float]
) -> dict[str, Any]:
    """The edge's own view of the step (scraped /metrics deltas): how much of what was sent it
    had read when sending stopped (the rest sat in HTTP/2 flow-control windows and socket
    buffers: the edge falling behind), and after the drain."""
    if not before or not after:
        return {}
    acc = "telehealth_edge_batches_in_total{result=accepted}"
    dup = "telehealth_edge_batches_in_total{result=duplicate}"

    def delta(m: dict[str, float], key: str) -> float:
        return m.get(key, 0.0) - before.get(key, 0.0)

    read_at_end = delta(at_send_end, acc) + delta(at_send_end, dup) if at_send_end else 0.0
    read_after = delta(after, acc) + delta(after, dup)
    out: dict[str, Any] = {
        "accepted": delta(after, acc),
        "duplicates": delta(after, dup),
        "rejected": delta(after, "telehealth_edge_batches_in_total{result=rejected}"),
        "events_out": delta(after, "telehealth_edge_events_out_total"),
        "fanout_dropped": delta(after, "telehealth_edge_fanout_dropped_total"),
        "unread_at_send_end": max(0.0, sent - read_at_end) if at_send_end else 0.0,
        "unread_after_drain": max(0.0, sent - read_after),
    }
    lag = {k: v for k, v in after.items() if "loop_lag" in k}
    if lag:
        out["loop_lag"] = lag
    return out


def step_result(
    rec: StepRecorder, step: StepSpec, wall_s: float, drops: int, cpu: dict[str, Any],
    rss: Sequence[tuple[float, dict[str, float]]] = (), server: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    rec.close()
    lost = max(0, rec.expected - rec.delivered)
    span_s = max(step.duration_s, (rec.last_delivery_ns - rec.t0_ns) / 1e9)
    seconds = math.ceil(span_s)
    rss_by_s: dict[int, dict[str, float]] = {}
    t_rss0 = rss[0][0] if rss else 0.0
    for t, row in rss:
        rss_by_s.setdefault(int(t - t_rss0), row)
    timeline = [
        {
            "t_s": s,
            "sent": rec.sent_by_s.get(s, 0),
            "delivered": rec.delivered_by_s.get(s, 0),
            "p99_ms": rec.p99_by_s.get(s, 0.0),
            "rss_mib": rss_by_s.get(s, {}),
        }
        for s in range(seconds + 2)
    ]
    latency = rec.latency_ms()
    loop_lag = rec.loop_lag.percentiles_ms()
    gen_cpu = float(cpu.get("generator", {}).get("cpu_percent", 0.0))
    return {
        "patients": rec.patients,
        "duration_s": step.duration_s,
        "ramp_s": step.ramp_s,
        "target_batches_per_s": rec.target_rate,
        "scheduled": rec.scheduled,
        "sent": rec.sent,
        "not_sent": rec.unsent,
        "expected": rec.expected,
        "delivered": rec.delivered,
        "duplicates": rec.duplicates,
        "lost": lost,
        "loss_ratio": lost / rec.expected if rec.expected else 0.0,
        "late": rec.late,
        "late_ms": rec.late_us / 1000,
        "drops": drops,
        "offered_batches_per_s": rec.sent / step.duration_s,
        # Over the time deliveries really took: an overloaded server still delivering in the
        # drain must not look faster than it was.
        "delivered_batches_per_s": rec.delivered / span_s,
        "delivery_span_s": round(span_s, 3),
        # Every expected delivery: received ones exactly, the rest as lower bounds.
        "latency_ms": latency,
        "latency_lower_bound": rec.lower_bound(latency),
        "latency_censored": {
            "not_sent": rec.censored_unsent,
            "undelivered": rec.censored_undelivered,
            "expired_before_drain_end": rec.expired,
        },
        "latency_cdf_ms": rec.hist.cdf_ms(CDF_POINTS),
        "generator_send_lag_ms": rec.send_lag.percentiles_ms(),
        "generator_loop_lag_ms": loop_lag,
        "generator_bound": generator_bound(gen_cpu, loop_lag["p99"], latency["p99"]),
        "server": server or {},
        "histogram_hdr": rec.hist.hist.encode().decode(),
        "timeline": timeline,
        "memory_growth": memory_growth(rss, skip_s=t_rss0 + step.ramp_s),
        "cpu": cpu,
        "wall_s": round(wall_s, 3),
        # The machine is shared; a high load average explains a noisy step.
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def video_text(v: dict[str, Any]) -> str:
    if not v.get("calls"):
        return "no calls" + (f" ({v['error']})" if v.get("error") else "")
    lat = v["latency_ms"]
    return (
        f"{v['calls']} call(s) fps min {v['fps_min']:.1f}, glass-to-glass p50 "
        f"{lat.get('p50', 0.0):.1f} ms p95 {lat.get('p95', 0.0):.1f} ms"
    )


def step_passes(result: dict[str, Any], p99_limit_ms: float) -> bool:
    """Sustainable: p99 under the limit, every batch sent, and every one delivered."""
    not_sent = result.get("not_sent", result["scheduled"] - result["sent"])
    return bool(
        result["delivered"] > 0
        and result["latency_ms"]["p99"] < p99_limit_ms
        and result["lost"] == 0
        and not_sent == 0
    )


async def _wait_subscribed(swarm: Swarm, want: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        have = await swarm.subscribers_ready()
        if have < 0:
            await asyncio.sleep(1.0)  # cannot see the server's count: give it a moment
            return
        if have >= want:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {have} of {want} subscriptions active after {timeout_s}s")
        await asyncio.sleep(0.05)


async def _settle(pids: dict[str, int], idle_percent: float = 25.0, limit_s: float = 10.0) -> None:
    """Before the next step, let the system under test finish the last one's backlog (an
    overloaded edge replicates its journal to the archive for a while), so each step starts
    from quiet; bounded, since a busy shared machine may never look idle."""
    from loadtest.host import sample

    await asyncio.sleep(0.5)
    if not pids:
        return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = [sample(pid) for pid in pids.values()]
        await asyncio.sleep(0.5)
        after = [sample(pid) for pid in pids.values()]
        busy = sum(
            (b.user_s + b.system_s) - (a.user_s + a.system_s)
            for a, b in zip(before, after, strict=True)
            if a is not None and b is not None
        )
        if 100 * busy / 0.5 < idle_percent:
            return


async def _sample_rss(
    pids: dict[str, int],
    out: list[tuple[float, dict[str, float]]],
    stop: asyncio.Event,
    t0: float,
    interval_s: float,
) -> None:
    """RSS of every process (SUT and generator) for the whole run, as (seconds, {name: MiB})."""
    from loadtest.host import sample

    while not stop.is_set():
        row: dict[str, float] = {}
        for name, pid in pids.items():
            s = sample(pid)
            if s is not None:
                row[name] = round(s.rss_bytes / 2**20, 2)
        out.append((round(time.monotonic() - t0, 3), row))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def run(spec: GeneratorSpec) -> dict[str, Any]:
    swarm = SWARMS[spec.path](spec)
    t_setup = time.monotonic()
    await swarm.setup()
    if isinstance(swarm, _GrpcSwarm):
        await swarm.subscribe_all()
    want = spec.watched * spec.viewers
    pids = {**spec.pids, "generator": os.getpid()}
    results: list[dict[str, Any]] = []
    planned_s = sum(s.duration_s + s.ramp_s for s in spec.steps)
    rss: list[tuple[float, dict[str, float]]] = []
    stop = asyncio.Event()
    background = [
        asyncio.create_task(_sample_rss(pids, rss, stop, t_setup, 0.25 if planned_s < 60 else 1.0)),
        asyncio.create_task(probe_loop_lag(lambda: swarm.current, stop)),
    ]
    setup_s = 0.0
    calls = None
    try:
        await _wait_subscribed(swarm, want)
        if spec.video_calls and isinstance(swarm, EdgeSwarm):
            from loadtest.calls import VideoCalls

            calls = VideoCalls(
                swarm.edge_address,
                [
                    {"session_id": p.session_id, "publisher_token": p.publisher_token,
                     "viewer_token": p.viewer_token}
                    for p in swarm.patients[: spec.video_calls]
                ],
                spec.label,
            )  # fmt: skip
            await calls.start()
        setup_s = time.monotonic() - t_setup
        # The generator timestamps deliveries: a collector pause here would be counted as the
        # system's latency.
        settle_heap()
        steps = list(spec.steps)
        planned = len(steps)
        passed: list[int] = []
        failed: list[int] = []
        bisected = 0
        i = 0
        while i < len(steps) and i < 64:
            step = steps[i]
            res = await _one_step(swarm, spec, i, step, pids, rss, calls)
            # Steps added by the search are marked so reports can tell them apart.
            res["bisect"] = i >= planned
            results.append(res)
            if spec.p99_limit_ms:
                ok = step_passes(res, spec.p99_limit_ms)
                res["passes"] = ok
                res["retry"] = step.retry
                # A failure with the generator's CPU saturated is not retried: a second try
                # would measure the same generator (retries are for the shared machine's noise).
                saturated_generator = res["generator_bound"]["cpu_percent"] >= GENERATOR_BOUND_CPU
                if not ok and not step.retry and spec.retry_failures and not saturated_generator:
                    # The machine may be shared: a level fails only if a second try fails too.
                    steps.insert(i + 1, StepSpec(step.patients, step.duration_s, 0.0, retry=True))
                    if i < planned:
                        planned += 1
                    i += 1
                    await _settle(spec.pids)
                    continue
                (passed if ok else failed).append(step.patients)
                fails_in_row = 0
                for r in reversed(results):
                    if r["passes"]:
                        break
                    fails_in_row += 1 if r["retry"] or not spec.retry_failures else 0
                if (
                    i < planned
                    and spec.stop_after_failures
                    and fails_in_row >= spec.stop_after_failures
                ):
                    del steps[i + 1 : planned]
                    planned = i + 1
                if i >= planned - 1 and failed and bisected < spec.bisect_steps:
                    hi = min(failed)
                    lo = max((p for p in passed if p < hi), default=0)
                    if hi - lo > 1:
                        steps.append(StepSpec((lo + hi) // 2, step.duration_s, 0.0))
                        bisected += 1
            i += 1
            if i < len(steps):
                await _settle(spec.pids)
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        if calls is not None:
            await calls.close()
        await swarm.close()
    first_ramp = spec.steps[0].ramp_s if spec.steps else 0.0
    return {
        "label": spec.label,
        "path": spec.path,
        "setup_s": round(setup_s, 2),
        "payload_bytes": list(swarm.book.sizes()),
        "stray_deliveries": swarm.stray,
        "deliveries_after_drain": swarm.after_drain,
        "stream_errors": swarm.errors,
        "viewer_tokens": getattr(swarm, "viewer_tokens", ""),
        "token_renewals": getattr(swarm, "renewals", 0),
        "viewer_token_renewals": getattr(swarm, "viewer_renewals", 0),
        "steps": results,
        # RSS of every process over the whole run (setup, steps, settling between them).
        "memory_growth": memory_growth(rss, skip_s=setup_s + first_ramp),
        "rss_timeline": [[t, row] for t, row in rss[:: max(1, len(rss) // 600)]],
    }


async def _one_step(
    swarm: Swarm,
    spec: GeneratorSpec,
    index: int,
    step: StepSpec,
    pids: dict[str, int],
    rss: list[tuple[float, dict[str, float]]],
    calls: Any = None,
) -> dict[str, Any]:
    from loadtest.host import contention, cpu_between, cpu_busy, sample

    await swarm.open_streams(step.patients)  # new streams for any reset in the last step
    t0 = time.perf_counter_ns() + 200_000_000  # a little time to create the senders
    late_ms = spec.p99_limit_ms or spec.late_ms
    rec = StepRecorder(index, step.patients, step.patients * spec.batch_rate_hz, t0, late_ms)
    swarm.current = rec
    drops0 = await swarm.read_drops()
    counters0 = await swarm.server_counters()
    before = {name: sample(pid) for name, pid in pids.items()}
    busy0 = cpu_busy()
    wall0 = time.monotonic()
    rss_from = len(rss)
    progress = Progress(spec.label, spec.progress)
    ptask = asyncio.create_task(progress.run(swarm, rec, step.duration_s))
    probe = asyncio.create_task(swarm.probe_server(rec))
    try:
        await swarm.run_step(rec, step)
        send_window = (wall0 + 0.2 + step.ramp_s, time.monotonic())
        counters_send_end = await swarm.server_counters()
        await swarm.wait_delivered(rec)
        swarm.finish_step(rec, time.perf_counter_ns())
    finally:
        ptask.cancel()
        probe.cancel()
        for outcome in await asyncio.gather(ptask, probe, return_exceptions=True):
            if isinstance(outcome, Exception):
                swarm.note_error("health probe", outcome)
        progress.done()
    wall = time.monotonic() - wall0
    after = {name: sample(pid) for name, pid in pids.items()}
    busy1 = cpu_busy()
    cpu = {name: cpu_between(before[name], after[name], wall) for name in pids}
    sut_own = sum(v["cpu_percent"] for k, v in cpu.items() if k != "generator")
    shared = {
        "sut_cpus": contention(busy0, busy1, wall, spec.sut_cpus, sut_own),
        "generator_cpus": contention(
            busy0, busy1, wall, spec.cpus, cpu["generator"]["cpu_percent"]
        ),
    }
    drops = (await swarm.read_drops()) - drops0
    server = server_figures(rec.sent, counters0, counters_send_end, await swarm.server_counters())
    if rec.server_rtt.count():
        server["health_check_rtt_ms"] = rec.server_rtt.percentiles_ms()
        server["health_check_timeouts"] = rec.server_rtt_timeouts
    res = step_result(rec, step, wall, drops, cpu, rss[rss_from:], server)
    res["cpu_contention"] = shared
    if calls is not None:
        res["video"] = calls.window(*send_window)
    lat, lb = res["latency_ms"], res["latency_lower_bound"]
    ge = {k: ">=" if lb.get(k) else "" for k in lat}
    gb = res["generator_bound"]
    print(
        f"[{spec.label}] {step.patients} patients: sent {rec.sent}/{rec.scheduled}, delivered "
        f"{rec.delivered}/{rec.expected}, late {rec.late}, p50 {ge['p50']}{lat['p50']:.2f} ms, "
        f"p99 {ge['p99']}{lat['p99']:.2f} ms, max {ge['max']}{lat['max']:.1f} ms, drops {drops}"
        + (f"; GENERATOR-BOUND ({'; '.join(gb['reasons'])})" if gb["bound"] else "")
        + (f"; video {video_text(res['video'])}" if "video" in res else ""),
        file=sys.stderr,
        flush=True,
    )
    return res


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m loadtest.generator SPEC.json OUT.json", file=sys.stderr)
        sys.exit(2)
    spec = GeneratorSpec.from_dict(json.loads(Path(args[0]).read_text()))
    if spec.cpus:
        # Before gRPC and paho start threads, so every thread inherits the mask.
        os.sched_setaffinity(0, set(spec.cpus))
    result = asyncio.run(run(spec))
    Path(args[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
