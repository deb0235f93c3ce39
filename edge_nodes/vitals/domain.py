"""Pure pieces of the vitals pipeline: batch validation and how far ahead a seq may run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_nodes.scoring.validation import impossible_reason
from telehealth.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from telehealth.security.tokens import SessionClaims
from telehealth.v1 import vitals_pb2
from telehealth.watermark import Watermark

# A seq far ahead of the watermark would make the pending set unbounded.
MAX_SEQ_AHEAD = 10_000
ECG_RATE_HZ = (100.0, 2000.0)
PPG_RATE_HZ = (1.0, 2000.0)
WAVEFORM_ABS_LIMIT = 50.0  # mV for ECG; PPG units are normalised to the same bound


def check_ahead(watermark: Watermark, seq: int) -> None:
    if seq > watermark.value + MAX_SEQ_AHEAD:
        raise InvalidArgument(
            f"seq {seq} is more than {MAX_SEQ_AHEAD} ahead of the received watermark "
            f"{watermark.value}; resend from {watermark.value + 1}"
        )


def check_refresh(current: SessionClaims, fresh: SessionClaims) -> None:
    """A refresh token may only extend a stream: same session, role and edge, later expiry."""
    for what, have, got in (
        ("session", current.session_id, fresh.session_id),
        ("role", current.role, fresh.role),
        ("edge", current.edge_id, fresh.edge_id),
    ):
        if have != got:
            raise PermissionDenied(
                f"refresh token is for {what} {got or '(none)'!r}, this stream's is {have!r}"
            )
    if fresh.expires_unix <= current.expires_unix:
        raise InvalidArgument(
            f"refresh token expires at unix {fresh.expires_unix}, not after the stream's "
            f"token ({current.expires_unix}); attach again for a fresh one"
        )


@dataclass(frozen=True)
class Limits:
    max_vitals: int
    max_samples: int


def validate_batch(batch: vitals_pb2.VitalsBatch, limits: Limits) -> list[npt.NDArray[np.float32]]:
    """Raise InvalidArgument / ResourceExhausted with a message naming the problem; return
    each waveform's samples as an array (converted once, used again by the scoring)."""
    arrays: list[npt.NDArray[np.float32]] = []
    if batch.seq == 0:
        raise InvalidArgument("seq must start at 1 and increase by one per batch")
    if not batch.vitals and not batch.waveforms:
        raise InvalidArgument(f"batch {batch.seq} is empty: send vitals, waveforms or both")
    if len(batch.vitals) > limits.max_vitals:
        raise ResourceExhausted(
            f"batch {batch.seq} has {len(batch.vitals)} readings; at most {limits.max_vitals}"
        )
    total = sum(len(w.samples) for w in batch.waveforms)
    if total > limits.max_samples:
        raise ResourceExhausted(
            f"batch {batch.seq} has {total} waveform samples; at most {limits.max_samples}"
        )
    if batch.device_time_unix_ns <= 0:
        raise InvalidArgument(f"batch {batch.seq}: device_time_unix_ns must be set")
    for i, v in enumerate(batch.vitals):
        if v.device_time_unix_ns <= 0:
            raise InvalidArgument(f"batch {batch.seq} reading {i}: device_time_unix_ns must be set")
        reason = impossible_reason(
            heart_rate_bpm=v.heart_rate_bpm if v.HasField("heart_rate_bpm") else None,
            spo2_percent=v.spo2_percent if v.HasField("spo2_percent") else None,
            respiration_rate_bpm=v.respiration_rate_bpm
            if v.HasField("respiration_rate_bpm")
            else None,
            systolic_mmhg=v.systolic_mmhg if v.HasField("systolic_mmhg") else None,
            diastolic_mmhg=v.diastolic_mmhg if v.HasField("diastolic_mmhg") else None,
            temperature_c=v.temperature_c if v.HasField("temperature_c") else None,
            consciousness=int(v.consciousness),
            oxygen_support=int(v.oxygen_support),
        )
        if reason is not None:
            raise InvalidArgument(f"batch {batch.seq} reading {i}: {reason}")
    for i, w in enumerate(batch.waveforms):
        where = f"batch {batch.seq} waveform {i}"
        if w.kind == vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II:
            lo, hi = ECG_RATE_HZ
        elif w.kind == vitals_pb2.WAVEFORM_KIND_PPG:
            lo, hi = PPG_RATE_HZ
        else:
            raise InvalidArgument(f"{where}: kind must be ECG_LEAD_II or PPG")
        if not (lo <= w.sample_rate_hz <= hi) or math.isnan(w.sample_rate_hz):
            raise InvalidArgument(
                f"{where}: sample_rate_hz {w.sample_rate_hz} outside {lo:g}-{hi:g} Hz"
            )
        if w.start_time_unix_ns <= 0:
            raise InvalidArgument(f"{where}: start_time_unix_ns must be set")
        if not w.samples:
            raise InvalidArgument(f"{where}: no samples")
        # fromiter is ~4x faster than asarray on a protobuf repeated field.
        arr = np.fromiter(w.samples, np.float32, len(w.samples))
        if not np.isfinite(arr).all():
            raise InvalidArgument(f"{where}: samples must be finite numbers (got NaN or inf)")
        if float(np.abs(arr).max()) > WAVEFORM_ABS_LIMIT:
            raise InvalidArgument(f"{where}: samples beyond ±{WAVEFORM_ABS_LIMIT:g} mV")
        arrays.append(arr)
    return arrays
