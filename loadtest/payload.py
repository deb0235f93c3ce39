"""Realistic batch payloads built before a run, so sending costs a few field writes, not a simulator."""

from __future__ import annotations

import time
from dataclasses import dataclass

from clients.simulator import PatientSimulator
from telehealth.v1 import vitals_pb2

# Distinct simulated patients whose signals the swarm reuses; more adds nothing but memory.
VARIANTS = 8
# Batches precomputed per variant; signals repeat after this (10 s at 25 batches/s).
CYCLE_BATCHES = 250


@dataclass(frozen=True)
class PayloadShape:
    batch_rate_hz: float
    ecg_hz: float
    vitals_rate_hz: float

    @property
    def samples_per_batch(self) -> int:
        return round(self.ecg_hz / self.batch_rate_hz) if self.ecg_hz else 0

    @property
    def vitals_every(self) -> int:
        """A reading goes in every n-th batch (0: never)."""
        return max(1, round(self.batch_rate_hz / self.vitals_rate_hz)) if self.vitals_rate_hz else 0


def _vitals(sim: PatientSimulator, t_s: float, stamp_ns: int) -> vitals_pb2.VitalSigns:
    v = sim.vitals_at(t_s)
    return vitals_pb2.VitalSigns(
        device_time_unix_ns=stamp_ns,
        heart_rate_bpm=v["heart_rate_bpm"],
        spo2_percent=v["spo2_percent"],
        respiration_rate_bpm=v["respiration_rate_bpm"],
        systolic_mmhg=v["systolic_mmhg"],
        diastolic_mmhg=v["diastolic_mmhg"],
        temperature_c=v["temperature_c"],
        consciousness=int(v["consciousness"]),  # type: ignore[arg-type]
        oxygen_support=int(v["oxygen_support"]),  # type: ignore[arg-type]
    )


class PayloadBook:
    """Precomputed VitalsBatch templates; `encode` fills in session, seq and times and serialises.

    The same bytes go to every path (the gRPC paths wrap them as PublishVitalsRequest field 1,
    MQTT publishes them bare), so peers carry identical payloads.
    """

    def __init__(self, shape: PayloadShape, variants: int = VARIANTS) -> None:
        self.shape = shape
        now = time.time_ns()
        self._templates: list[list[vitals_pb2.VitalsBatch]] = []
        n = shape.samples_per_batch
        for v in range(variants):
            sim = PatientSimulator("stable", seed=v, ecg_rate_hz=shape.ecg_hz or 250.0)
            cycle: list[vitals_pb2.VitalsBatch] = []
            for k in range(CYCLE_BATCHES):
                t_s = k / shape.batch_rate_hz
                b = vitals_pb2.VitalsBatch(device_time_unix_ns=now)
                if n:
                    b.waveforms.add(
                        kind=vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II,
                        start_time_unix_ns=now,
                        sample_rate_hz=shape.ecg_hz,
                        samples=sim.ecg_chunk(t_s, n).tolist(),
                    )
                if shape.vitals_every and k % shape.vitals_every == 0:
                    b.vitals.append(_vitals(sim, t_s, now))
                cycle.append(b)
            self._templates.append(cycle)

    def encode(
        self, patient: int, session_id: str, seq: int, t0_unix_ns: int, send_unix_ns: int
    ) -> bytes:
        """VitalsBatch bytes for `seq` (from 1) of `patient`, whose stream started at t0."""
        b = self._templates[patient % len(self._templates)][(seq - 1) % CYCLE_BATCHES]
        b.session_id = session_id
        b.seq = seq
        b.device_time_unix_ns = send_unix_ns
        if b.waveforms:
            n = self.shape.samples_per_batch
            # Contiguous sample times, so the edge's R-peak detector sees one unbroken signal.
            b.waveforms[0].start_time_unix_ns = t0_unix_ns + round(
                (seq - 1) * n * 1e9 / self.shape.ecg_hz
            )
        if b.vitals:
            b.vitals[0].device_time_unix_ns = send_unix_ns
        return b.SerializeToString()

    def sizes(self) -> tuple[int, int]:
        """Smallest and largest batch in bytes (with a typical session id and seq)."""
        lens = [
            len(self.encode(i, "ses_" + "0" * 32, 1000 + k, 1, 1))
            for i in range(len(self._templates))
            for k in range(1, 30)
        ]
        return min(lens), max(lens)


def wrap_publish(batch: bytes) -> bytes:
    """PublishVitalsRequest{batch} without a parse/serialise round trip: field 1, length-delimited."""
    return b"\x0a" + _varint(len(batch)) + batch


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
