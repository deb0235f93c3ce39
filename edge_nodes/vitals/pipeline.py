"""One session's pipeline at the edge: dedup, score (NEWS2, ECG heart rate, alerts), fan out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_nodes.scoring.ecg import RPeakDetector
from edge_nodes.scoring.news2 import LatestVitals, News2Score, RiskBand, SpO2Scale, compute_news2
from edge_nodes.vitals.domain import InvalidBatch, Limits, check_ahead, validate_batch
from edge_nodes.vitals.fanout import Fanout, Subscriber
from telehealth.errors import DomainError
from telehealth.v1 import vitals_pb2
from telehealth.watermark import Watermark

Event = vitals_pb2.SubscribeVitalsResponse
DERIVED_HR_PERIOD_NS = 1_000_000_000
# Device and ECG heart rate disagreeing by more than this is worth a clinician's look.
HR_DISAGREEMENT_BPM = 20.0


@dataclass(frozen=True)
class IngestResult:
    accepted: bool
    duplicate: bool = False
    rejection: DomainError | None = None
    # Refused, but its seq is consumed: journal and forward a tombstone for it.
    tombstone: bool = False
    # The waveforms' samples as arrays, in batch order (accepted batches only).
    waveforms: tuple[npt.NDArray[np.float64], ...] = ()


class SessionChannel:
    def __init__(
        self,
        session_id: str,
        spo2_scale: int,
        limits: Limits,
        ecg_window_s: float,
        start_seq: int = 0,
        patient_id: str = "",
    ) -> None:
        self.session_id = session_id
        self.spo2_scale = SpO2Scale(spo2_scale if spo2_scale in (1, 2) else 1)
        self.limits = limits
        self.patient_id = patient_id
        # A session placed here after another edge resumes after what the archive holds.
        # `watermark`: seqs admitted (dedup); `received`: seqs journaled, which is all an
        # ack may claim (a batch is admitted before its commit, acked only after).
        self.watermark = Watermark(start_seq)
        self.received = Watermark(start_seq)
        self.archived_seq = start_seq
        self.latest = LatestVitals()
        self.news2: News2Score | None = None
        self.news2_unix_ns = 0
        self.news2_seq = 0
        self.last_event: dict[str, Event] = {}
        self.fanout: Fanout[Event] = Fanout()
        self._ecg_window_s = ecg_window_s
        self._ecg: RPeakDetector | None = None
        self._derived_at_ns = 0
        self._hr_disagreeing = False
        self.released: str | None = None
        # Set while the core moves the session away (make-before-break): publishers and
        # viewers are told, and served on until the release.
        self.moving: vitals_pb2.SessionMoving | None = None
        self.publishers = 0
        # Wake-ups of the open publish streams, so a move or a release reaches an idle one.
        self.publisher_wakers: set[Callable[[], None]] = set()

    # -- ingest -------------------------------------------------------------------------

    def ingest(self, batch: vitals_pb2.VitalsBatch, now_ns: int) -> IngestResult:
        """admit() then process(): for callers that need no journal in between."""
        result = self.admit(batch, now_ns)
        if result.accepted or result.tombstone:
            self.journaled(batch.seq)
        if result.accepted:
            self.process(batch, now_ns, result.waveforms)
        return result

    def admit(self, batch: vitals_pb2.VitalsBatch, now_ns: int) -> IngestResult:
        """Validate and dedup one batch. An accepted batch is marked received at once, so a
        racing copy on another stream is a duplicate; the caller journals it, then process().
        A refused batch whose seq is consumed comes back with tombstone=True: the caller
        journals a tombstone for it, so the archive's watermark passes the seq."""
        if batch.seq == 0:
            return IngestResult(
                accepted=False,
                rejection=InvalidBatch(
                    "seq must start at 1 and increase by one per batch", "seq_zero", ("seq",)
                ),
            )
        if self.watermark.seen(batch.seq):
            return IngestResult(accepted=False, duplicate=True)
        try:
            check_ahead(self.watermark, batch.seq)
        except DomainError as e:
            # Not consumed: the device is told to resend from the watermark, and this seq
            # must be taken when it comes again in its turn.
            return IngestResult(accepted=False, rejection=e)
        try:
            arrays = validate_batch(batch, self.limits, now_ns)
        except DomainError as e:
            # The seq is consumed so the device moves on; nothing of the batch is kept.
            self.watermark.add(batch.seq)
            return IngestResult(accepted=False, rejection=e, tombstone=True)
        self.watermark.add(batch.seq)
        return IngestResult(accepted=True, waveforms=tuple(arrays))

    def journaled(self, seq: int) -> None:
        """The seq's batch (or tombstone) is committed to the journal: acks may claim it."""
        self.received.add(seq)

    def archived(self, seq: int) -> None:
        """The archive holds everything up to seq, so it counts as received here too: after
        a move, seqs the old edge archived are never resent and must not hold the ack back."""
        if seq > self.archived_seq:
            self.archived_seq = seq
            self.watermark.advance_to(seq)
            self.received.advance_to(seq)

    def process(
        self,
        batch: vitals_pb2.VitalsBatch,
        now_ns: int,
        waveforms: tuple[npt.NDArray[np.float64], ...] = (),
    ) -> int:
        """Score and fan out an admitted (and journaled) batch; return the alerts raised."""
        events = [Event(session_id=self.session_id, edge_received_unix_ns=now_ns, batch=batch)]
        if batch.vitals:
            for v in batch.vitals:
                self.latest.update(
                    device_time_unix_ns=v.device_time_unix_ns,
                    heart_rate_bpm=v.heart_rate_bpm if v.HasField("heart_rate_bpm") else None,
                    spo2_percent=v.spo2_percent if v.HasField("spo2_percent") else None,
                    respiration_rate_bpm=v.respiration_rate_bpm
                    if v.HasField("respiration_rate_bpm")
                    else None,
                    systolic_mmhg=v.systolic_mmhg if v.HasField("systolic_mmhg") else None,
                    temperature_c=v.temperature_c if v.HasField("temperature_c") else None,
                    consciousness=int(v.consciousness),
                    oxygen_support=int(v.oxygen_support),
                    diastolic_mmhg=v.diastolic_mmhg if v.HasField("diastolic_mmhg") else None,
                )
            events.extend(self._score(batch.seq, now_ns))
        for i, w in enumerate(batch.waveforms):
            if w.kind == vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II:
                if i < len(waveforms):
                    # Checked by validate_batch already: finite, in range, float64.
                    self._feed_ecg(w, waveforms[i], checked=True)
                else:
                    self._feed_ecg(w, np.fromiter(w.samples, np.float64, len(w.samples)))
        if self._ecg is not None and now_ns - self._derived_at_ns >= DERIVED_HR_PERIOD_NS:
            events.extend(self._derive_heart_rate(batch.seq, now_ns))
        alerts = 0
        for ev in events:
            if ev.HasField("alert"):
                alerts += 1
            self.fanout.publish(ev)
        return alerts

    def _score(self, seq: int, now_ns: int) -> list[Event]:
        prev = self.news2
        score = compute_news2(
            self.latest, self.spo2_scale, now_ns, self.limits.news2_max_input_age_ns
        )
        self.news2, self.news2_unix_ns, self.news2_seq = score, now_ns, seq
        news2 = vitals_pb2.News2Update(
            seq=seq,
            total=score.total,
            band=int(score.band),  # type: ignore[arg-type]
            parameters=[
                vitals_pb2.ParameterScore(
                    parameter=p.parameter,
                    score=p.score,
                    value=p.value,
                    measured_unix_ns=p.measured_unix_ns,
                    stale=p.stale,
                )
                for p in score.parameters
            ],
            spo2_scale=int(self.spo2_scale),  # type: ignore[arg-type]
            complete=score.complete,
            computed_unix_ns=now_ns,
            oldest_input_unix_ns=score.oldest_input_unix_ns,
        )
        out = [
            self._remember(
                Event(session_id=self.session_id, edge_received_unix_ns=now_ns, news2=news2)
            )
        ]
        prev_band = prev.band if prev is not None else RiskBand.UNSPECIFIED
        # The first score only alerts when it is already above low: a new view is not news.
        if score.band != prev_band and (prev is not None or score.band > RiskBand.LOW):
            out.append(
                self._alert(
                    seq,
                    now_ns,
                    vitals_pb2.ALERT_KIND_BAND_CHANGED,
                    prev_band,
                    score.band,
                    f"NEWS2 {score.total}: risk {prev_band.name.lower()} -> "
                    f"{score.band.name.lower()}",
                )
            )
        prev_red = (
            {p.parameter for p in prev.parameters if p.score == 3 and not p.stale}
            if prev
            else set()
        )
        for p in score.parameters:
            if p.score == 3 and not p.stale and p.parameter not in prev_red:
                out.append(
                    self._alert(
                        seq,
                        now_ns,
                        vitals_pb2.ALERT_KIND_SINGLE_PARAMETER_RED,
                        score.band,
                        score.band,
                        f"{p.parameter} scores 3 (value {p.value:g})",
                    )
                )
        return out

    def _alert(
        self, seq: int, now_ns: int, kind: int, prev: RiskBand, band: RiskBand, message: str
    ) -> Event:
        return self._remember(
            Event(
                session_id=self.session_id,
                edge_received_unix_ns=now_ns,
                alert=vitals_pb2.Alert(
                    seq=seq,
                    kind=kind,  # type: ignore[arg-type]
                    previous_band=int(prev),  # type: ignore[arg-type]
                    band=int(band),  # type: ignore[arg-type]
                    message=message,
                    raised_unix_ns=now_ns,
                ),
            )
        )

    def _feed_ecg(
        self, w: vitals_pb2.WaveformChunk, samples: npt.NDArray[np.float64], checked: bool = False
    ) -> None:
        if self._ecg is None or self._ecg.sample_rate_hz != w.sample_rate_hz:
            self._ecg = RPeakDetector(w.sample_rate_hz, window_s=self._ecg_window_s)
        self._ecg.feed(samples, w.start_time_unix_ns, finite=checked)

    def _derive_heart_rate(self, seq: int, now_ns: int) -> list[Event]:
        assert self._ecg is not None
        self._derived_at_ns = now_ns
        bpm, peaks = self._ecg.heart_rate_bpm()
        if bpm is None:
            return []
        device = self.latest.heart_rate_bpm
        device_bpm = device.value if device is not None else 0.0
        out = [
            self._remember(
                Event(
                    session_id=self.session_id,
                    edge_received_unix_ns=now_ns,
                    derived_heart_rate=vitals_pb2.DerivedHeartRate(
                        seq=seq,
                        ecg_heart_rate_bpm=bpm,
                        device_heart_rate_bpm=device_bpm,
                        r_peaks=peaks,
                        computed_unix_ns=now_ns,
                    ),
                )
            )
        ]
        disagree = device is not None and abs(bpm - device_bpm) > HR_DISAGREEMENT_BPM
        if disagree and not self._hr_disagreeing:
            band = self.news2.band if self.news2 else RiskBand.UNSPECIFIED
            out.append(
                self._alert(
                    seq,
                    now_ns,
                    vitals_pb2.ALERT_KIND_HEART_RATE_DISAGREES,
                    band,
                    band,
                    f"ECG heart rate {bpm:.0f} bpm vs device {device_bpm:.0f} bpm: check the sensor",
                )
            )
        self._hr_disagreeing = disagree
        return out

    def _remember(self, ev: Event) -> Event:
        self.last_event[ev.WhichOneof("event") or ""] = ev
        return ev

    # -- subscribers ----------------------------------------------------------------------

    def latest_vitals(self) -> Event | None:
        """The latest value of every field as one batch event with seq 0 (not a published
        batch): one reading per distinct measurement time, so each value keeps its own
        device time and a view shows its true age. None before any reading."""
        lv = self.latest
        fields = (
            ("heart_rate_bpm", lv.heart_rate_bpm),
            ("spo2_percent", lv.spo2_percent),
            ("respiration_rate_bpm", lv.respiration_rate_bpm),
            ("systolic_mmhg", lv.systolic_mmhg),
            ("diastolic_mmhg", lv.diastolic_mmhg),
            ("temperature_c", lv.temperature_c),
            ("consciousness", lv.consciousness),
            ("oxygen_support", lv.oxygen_support),
        )
        readings: dict[int, vitals_pb2.VitalSigns] = {}
        for name, obs in fields:
            if obs is None:
                continue
            v = readings.get(obs.measured_unix_ns)
            if v is None:
                v = readings[obs.measured_unix_ns] = vitals_pb2.VitalSigns(
                    device_time_unix_ns=obs.measured_unix_ns
                )
            if name in ("consciousness", "oxygen_support"):
                setattr(v, name, int(obs.value))
            else:
                setattr(v, name, obs.value)
        if not readings:
            return None
        batch = vitals_pb2.VitalsBatch(
            session_id=self.session_id,
            seq=0,
            device_time_unix_ns=max(readings),
            vitals=[readings[t] for t in sorted(readings)],
        )
        return Event(session_id=self.session_id, edge_received_unix_ns=time.time_ns(), batch=batch)

    def subscribe(self, sub: Subscriber[Event], include_latest: bool) -> None:
        if include_latest:
            # Vitals first, then what was computed from them: a new view is never blank.
            snapshot = self.latest_vitals()
            if snapshot is not None:
                sub.offer(snapshot)
            for kind in ("news2", "derived_heart_rate", "alert"):
                if kind in self.last_event:
                    sub.offer(self.last_event[kind])
        if self.moving is not None:
            # A view opened while the session moves learns at once where to go.
            sub.offer(self._moving_event())
        self.fanout.add(sub)

    # -- leaving this edge ----------------------------------------------------------------

    def _moving_event(self) -> Event:
        assert self.moving is not None
        return Event(
            session_id=self.session_id, edge_received_unix_ns=time.time_ns(), moving=self.moving
        )

    def move(self, new_edge_id: str, reason: str) -> None:
        """The core is moving the session to new_edge_id: tell every publisher and viewer;
        keep taking batches and serving views until release()."""
        self.moving = vitals_pb2.SessionMoving(new_edge_id=new_edge_id, reason=reason)
        self.fanout.publish(self._moving_event())
        self._wake_publishers()

    def release(self, reason: str) -> None:
        self.released = reason
        self.fanout.close_all(reason)
        self._wake_publishers()

    def _wake_publishers(self) -> None:
        for wake in list(self.publisher_wakers):
            wake()

    @property
    def subscribers(self) -> int:
        return len(self.fanout.subscribers)
