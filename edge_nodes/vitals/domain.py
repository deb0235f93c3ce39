"""Pure pieces of the vitals pipeline: batch validation and how far ahead a seq may run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_nodes.scoring.validation import impossible
from telehealth.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from telehealth.security.tokens import SessionClaims
from telehealth.v1 import vitals_pb2
from telehealth.watermark import Watermark

# A seq far ahead of the watermark would make the pending set unbounded.
MAX_SEQ_AHEAD = 10_000
ECG_RATE_HZ = (100.0, 2000.0)
PPG_RATE_HZ = (1.0, 2000.0)
WAVEFORM_ABS_LIMIT = 50.0  # mV for ECG; PPG units are normalised to the same bound
ECG = vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II
PPG = vitals_pb2.WAVEFORM_KIND_PPG


class InvalidBatch(InvalidArgument):
    """A refused batch. The message, for the device, may quote the values at fault; reason
    (a stable code) and fields (proto field names) are what a log may carry."""

    def __init__(self, message: str, reason: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.fields = fields


class OversizeBatch(ResourceExhausted):
    """A batch over the size limits; reason and fields as for InvalidBatch."""

    def __init__(self, message: str, reason: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.fields = fields


def check_ahead(watermark: Watermark, seq: int) -> None:
    if seq > watermark.value + MAX_SEQ_AHEAD:
        raise InvalidBatch(
            f"seq {seq} is more than {MAX_SEQ_AHEAD} ahead of the received watermark "
            f"{watermark.value}; resend from {watermark.value + 1}",
            "seq_far_ahead",
            ("seq",),
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
    # How far ahead of the edge clock a device time may be (the device's clock runs fast).
    max_clock_skew_ns: int = 300 * 1_000_000_000
    # NEWS2 leaves out inputs measured longer ago than this (see news2_max_input_age_s).
    news2_max_input_age_ns: int = 3600 * 1_000_000_000


def _time_refusal(t_ns: int, now_ns: int, limits: Limits, where: str, field: str) -> InvalidBatch:
    if t_ns <= 0:
        return InvalidBatch(f"{where}: {field} must be set", "time_missing", (field,))
    return InvalidBatch(
        f"{where}: {field} is {(t_ns - now_ns) / 1e9:.0f} s ahead of the edge clock (at most "
        f"{limits.max_clock_skew_ns / 1e9:g} s allowed); check the device's clock",
        "time_in_future",
        (field,),
    )


def validate_batch(
    batch: vitals_pb2.VitalsBatch, limits: Limits, now_ns: int
) -> list[npt.NDArray[np.float64]]:
    """Raise InvalidBatch / OversizeBatch with a message naming the problem; return each
    waveform's samples as a checked float64 array (converted once, used again by the
    scoring, which need not check them again). now_ns is the edge clock: device times too
    far ahead of it are refused.

    Runs for every batch: each protobuf field is read once (every read of a repeated field
    builds a new view) and messages are only formatted for a refusal."""
    seq = batch.seq
    if seq == 0:
        raise InvalidBatch(
            "seq must start at 1 and increase by one per batch", "seq_zero", ("seq",)
        )
    vitals = batch.vitals
    waveforms = batch.waveforms
    if not vitals and not waveforms:
        raise InvalidBatch(
            f"batch {seq} is empty: send vitals, waveforms or both",
            "empty",
            ("vitals", "waveforms"),
        )
    if len(vitals) > limits.max_vitals:
        raise OversizeBatch(
            f"batch {seq} has {len(vitals)} readings; at most {limits.max_vitals}",
            "too_many_readings",
            ("vitals",),
        )
    samples = [w.samples for w in waveforms]
    total = sum(map(len, samples))
    if total > limits.max_samples:
        raise OversizeBatch(
            f"batch {seq} has {total} waveform samples; at most {limits.max_samples}",
            "too_many_samples",
            ("samples",),
        )
    latest_ns = now_ns + limits.max_clock_skew_ns
    t = batch.device_time_unix_ns
    if not 0 < t <= latest_ns:
        raise _time_refusal(t, now_ns, limits, f"batch {seq}", "device_time_unix_ns")
    for i, v in enumerate(vitals):
        t = v.device_time_unix_ns
        if not 0 < t <= latest_ns:
            raise _time_refusal(
                t, now_ns, limits, f"batch {seq} reading {i}", "device_time_unix_ns"
            )
        found = impossible(
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
        if found is not None:
            fields, reason = found
            raise InvalidBatch(f"batch {seq} reading {i}: {reason}", "impossible_value", fields)
    arrays: list[npt.NDArray[np.float64]] = []
    for i, w in enumerate(waveforms):
        kind = w.kind
        if kind == ECG:
            lo, hi = ECG_RATE_HZ
        elif kind == PPG:
            lo, hi = PPG_RATE_HZ
        else:
            raise InvalidBatch(
                f"batch {seq} waveform {i}: kind must be ECG_LEAD_II or PPG",
                "waveform_kind",
                ("kind",),
            )
        rate = w.sample_rate_hz
        if not lo <= rate <= hi:  # NaN fails too
            raise InvalidBatch(
                f"batch {seq} waveform {i}: sample_rate_hz {rate} outside {lo:g}-{hi:g} Hz",
                "waveform_rate",
                ("sample_rate_hz",),
            )
        t = w.start_time_unix_ns
        if not 0 < t <= latest_ns:
            raise _time_refusal(
                t, now_ns, limits, f"batch {seq} waveform {i}", "start_time_unix_ns"
            )
        chunk = samples[i]
        n = len(chunk)
        if not n:
            raise InvalidBatch(
                f"batch {seq} waveform {i}: no samples", "waveform_empty", ("samples",)
            )
        # fromiter is ~4x faster than asarray on a protobuf repeated field; float64 is what
        # the ECG filters take, so the scoring uses this array as it is.
        arr = np.fromiter(chunk, np.float64, n)
        # One pass for both checks: NaN and inf fail the comparison too.
        if not float(np.abs(arr).max()) <= WAVEFORM_ABS_LIMIT:
            if not np.isfinite(arr).all():
                raise InvalidBatch(
                    f"batch {seq} waveform {i}: samples must be finite numbers (got NaN or inf)",
                    "waveform_not_finite",
                    ("samples",),
                )
            raise InvalidBatch(
                f"batch {seq} waveform {i}: samples beyond ±{WAVEFORM_ABS_LIMIT:g} mV",
                "waveform_amplitude",
                ("samples",),
            )
        arrays.append(arr)
    return arrays
