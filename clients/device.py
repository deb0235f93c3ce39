"""telehealth-device: a patient's device agent streaming a simulated patient through the mesh."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from clients.simulator import PatientSimulator
from clients.tlsflags import add_tls_flags, tls_from_flags
from telehealth.rpc import bearer, install_signal_handlers, secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.telemetry.logging import configure_logging
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)

log = logging.getLogger("device")

# How many unacknowledged batches a device keeps while its edge is unreachable
# (25 batches/s for 10 minutes); past that the oldest go, and the loss is logged.
MAX_PENDING = 15_000
# Status codes after which the device asks the core where its session lives now.
REPLACE_CODES = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


@dataclass
class DeviceStats:
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    duplicates: int = 0
    reconnects: int = 0
    dropped_unacked: int = 0
    archived: int = 0
    edges: list[str] = field(default_factory=list)
    # Seconds from the last acknowledgement before each loss to the first one after it.
    gaps_s: list[float] = field(default_factory=list)
    # Seconds from asking the core for a zone change to the first ack from the new edge.
    handovers_s: list[float] = field(default_factory=list)


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


class DeviceAgent:
    """Opens a session, streams batches on the clock, keeps every batch until the edge has it,
    and on any loss asks the core for the current placement and resumes after the watermark."""

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
        self.assignment: sessions_pb2.Assignment | None = None
        self.received_seq = 0
        self.archived_seq = 0
        self._last_ack = 0.0
        self._lost_at: float | None = None
        self._switch_to: sessions_pb2.Assignment | None = None
        self._switched = asyncio.Event()
        self._handover_from: float | None = None
        self._sessions_stub: sessions_pb2_grpc.SessionsServiceAsyncStub | None = None
        self._pending: OrderedDict[int, vitals_pb2.VitalsBatch] = OrderedDict()
        self._next_seq = 1
        self._wake = asyncio.Event()
        self.opened = asyncio.Event()

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

    def enqueue(self, batch: vitals_pb2.VitalsBatch) -> None:
        self._pending[batch.seq] = batch
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
            self.stats.dropped_unacked += 1
        self._wake.set()

    def _ack(self, received_seq: int, archived_seq: int) -> None:
        now = time.monotonic()
        if self._lost_at is not None:
            # First acknowledgement after a loss: that was the gap the patient's data saw.
            self.stats.gaps_s.append(now - self._lost_at)
            self._lost_at = None
        self._last_ack = now
        self.received_seq = max(self.received_seq, received_seq)
        self.stats.acked = self.received_seq
        self._archived(archived_seq)

    def _archived(self, archived_seq: int) -> None:
        # Batches are only let go once the archive has them: any edge may die before that.
        if archived_seq <= self.archived_seq:
            return
        self.archived_seq = archived_seq
        self.stats.archived = archived_seq
        while self._pending and next(iter(self._pending)) <= archived_seq:
            self._pending.popitem(last=False)

    # -- session ------------------------------------------------------------------------

    async def _open(
        self, sessions: sessions_pb2_grpc.SessionsServiceAsyncStub, unreachable: str = ""
    ) -> None:
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
            self.assignment = resp.assignment
            for b in self._pending.values():
                b.session_id = self.session_id
            self.opened.set()
        else:
            resp2 = await sessions.Attach(
                sessions_pb2.AttachSessionRequest(
                    session_id=self.session_id,
                    role=sessions_pb2.ROLE_PUBLISHER,
                    unreachable_edge_id=unreachable,
                ),
                metadata=bearer(self.assignment.token) if self.assignment else None,
                timeout=5,
            )
            self.assignment = resp2.assignment
        self.stats.edges.append(self.assignment.edge_id)

    # -- streaming ------------------------------------------------------------------------

    async def _outgoing(self) -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
        # A new stream resends everything the archive does not hold yet.
        sent_upto = self.archived_seq
        while True:
            progressed = False
            for seq, b in list(self._pending.items()):
                if seq > sent_upto:
                    sent_upto = seq
                    self.stats.sent += 1
                    progressed = True
                    yield vitals_pb2.PublishVitalsRequest(batch=b)
            if not progressed:
                self._wake.clear()
                await self._wake.wait()

    async def _publish_once(self, channel: grpc.aio.Channel) -> None:
        assert self.assignment is not None
        stub = vitals_pb2_grpc.VitalsServiceStub(channel)
        call = stub.Publish(self._outgoing(), metadata=bearer(self.assignment.token))
        try:
            async for resp in call:
                if self._handover_from is not None:
                    self.stats.handovers_s.append(time.monotonic() - self._handover_from)
                    self._handover_from = None
                if resp.HasField("rejection"):
                    self.stats.rejected += 1
                    log.warning(
                        "edge rejected a batch",
                        extra={"seq": resp.rejection.seq, "reason": resp.rejection.message},
                    )
                self.stats.duplicates += resp.duplicates_dropped
                self._ack(resp.received_seq, resp.archived_seq)
        finally:
            call.cancel()

    async def run(self, stop: asyncio.Event, duration_s: float = 0.0) -> DeviceStats:
        """Produce and stream until stop (or duration) and every batch is acknowledged."""
        producer = asyncio.create_task(self._produce(stop, duration_s))
        try:
            await self._stream(stop, producer)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
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
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass

    async def _stream(self, stop: asyncio.Event, producer: asyncio.Task[None]) -> None:
        backoff = 0.05
        unreachable = ""
        async with secure_channel(self.cfg.core_address, self.cfg.tls) as core:
            sessions = sessions_pb2_grpc.SessionsServiceStub(core)
            self._sessions_stub = sessions
            while True:
                if (producer.done() or stop.is_set()) and not self._pending:
                    return
                at_edge = False
                try:
                    if self._switch_to is not None:
                        self.assignment, self._switch_to = self._switch_to, None
                        self.stats.edges.append(self.assignment.edge_id)
                    else:
                        await self._open(sessions, unreachable)
                    unreachable = ""
                    assert self.assignment is not None
                    at_edge = True
                    async with secure_channel(self.assignment.edge_address, self.cfg.tls) as edge:
                        publish = asyncio.create_task(self._publish_once(edge))
                        finished = asyncio.create_task(self._until_done(stop, producer, core))
                        switch = asyncio.create_task(self._switched.wait())
                        done, _ = await asyncio.wait(
                            {publish, finished, switch}, return_when=asyncio.FIRST_COMPLETED
                        )
                        for t in (publish, finished, switch):
                            if t not in done:
                                t.cancel()
                        await asyncio.gather(publish, finished, switch, return_exceptions=True)
                        if finished in done:
                            return
                        if switch in done:
                            # Zone change: the new edge is ready; move the stream there now.
                            self._switched.clear()
                            continue
                        publish.result()
                        backoff = 0.05
                except grpc.aio.AioRpcError as e:
                    if e.code() not in REPLACE_CODES:
                        raise
                    self.stats.reconnects += 1
                    if self._lost_at is None and self._last_ack:
                        self._lost_at = self._last_ack
                    if at_edge and e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        unreachable = self.assignment.edge_id if self.assignment else ""
                    log.info(
                        "stream lost; asking the core again",
                        extra={"code": e.code().name, "detail": e.details(), "retry_s": backoff},
                    )
                    if at_edge and backoff <= 0.05:
                        # The first retry after losing an edge goes at once: the core checks
                        # the edge and answers with a new placement if it is gone.
                        backoff = 0.1
                        continue
                delay = backoff * (0.5 + random.random())
                backoff = min(backoff * 2, 5.0)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                if stop.is_set() and producer.done() and not self._pending:
                    return

    async def change_zone(self, zone: str) -> bool:
        """The device moved to another zone (a 5G handover): the core readies an edge there,
        then the stream moves to it. Returns whether the session moved."""
        if self._sessions_stub is None:
            raise RuntimeError("the device has not reached the core yet")
        assert self.assignment is not None
        asked = time.monotonic()
        resp = await self._sessions_stub.ChangeZone(
            sessions_pb2.ChangeZoneRequest(session_id=self.session_id, zone=zone),
            metadata=bearer(self.assignment.token),
            timeout=5,
        )
        self.cfg.zone = zone
        if resp.moved:
            self._handover_from = asked
            self._switch_to = resp.assignment
            self._switched.set()
        return bool(resp.moved)

    async def _until_done(
        self, stop: asyncio.Event, producer: asyncio.Task[None], core: grpc.aio.Channel
    ) -> None:
        await asyncio.wait(
            {producer, asyncio.create_task(stop.wait())}, return_when="FIRST_COMPLETED"
        )
        # Wait for the edge to take what is in flight, then for the archive to hold it.
        deadline = time.monotonic() + 10.0
        last = self._next_seq - 1
        while self.received_seq < last and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        archive = archive_pb2_grpc.ArchiveServiceStub(core)
        while self._pending and time.monotonic() < deadline:
            try:
                wm = await archive.GetWatermark(
                    archive_pb2.GetWatermarkRequest(session_id=self.session_id), timeout=2
                )
                self._archived(wm.watermark.archived_seq)
            except grpc.aio.AioRpcError:
                pass
            if self._pending:
                await asyncio.sleep(0.1)


async def run_swarm(
    cfgs: Sequence[DeviceConfig], stop: asyncio.Event, duration_s: float = 0.0
) -> list[DeviceStats]:
    agents = [DeviceAgent(c) for c in cfgs]
    return await asyncio.gather(*(a.run(stop, duration_s) for a in agents))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="telehealth-device",
        description="Stream a simulated patient (vitals and ECG) through the mesh: opens a session "
        "at the core, publishes to the edge it is placed on, reconnects and resumes on loss.",
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
