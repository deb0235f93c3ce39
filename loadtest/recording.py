"""The load generator's bookkeeping, kept apart from the network so it can be tested alone.

- `Hist`: an HdrHistogram fed in bulk. hdrh's `record_value` is pure Python (~9 us a call on
  this machine); at thousands of batches a second, three records per batch were a sizeable
  share of the generator's one core. Values are appended to a buffer (tens of ns) and folded
  into the histogram's own counts array with numpy, using hdrh's index formula, so encoding,
  percentiles and everything else stay hdrh's.
- `Segment`: one step's batches of one patient. Seq -> scheduled time is arithmetic
  (start + k * period), so the generator keeps O(steps) per patient instead of a tuple per
  batch (a 30-minute soak grew the generator from 88 to 391 MiB that way).
- `SeenWindow`: which seqs one viewer received, over a bounded window of recent seqs.
- `memory_growth`: RSS growth of each process from a sampled timeline.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

# Latencies are recorded in microseconds, from 1 us to 60 s, 3 significant digits. A value at
# the cap means "60 s or more" and is treated as a lower bound.
HIST_MAX_US = 60_000_000
# A batch not received this long after it was due is counted undelivered there and then (its
# latency, >= this, is at the histogram's cap anyway), so the receive window stays bounded.
EXPIRE_S = HIST_MAX_US / 1e6
# Buffered values are folded into the counts this often (and before every read).
FLUSH_AT = 4096
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


class Hist:
    """An HdrHistogram (1 us .. HIST_MAX_US) whose values are recorded in bulk."""

    def __init__(self, digits: int = 3) -> None:
        self.h = HdrHistogram(1, HIST_MAX_US, digits)
        self._buf = array("q")
        # A writable numpy view of hdrh's ctypes counts array (same memory).
        self._counts = np.ctypeslib.as_array(self.h.counts)

    def add(self, us: int) -> None:
        self._buf.append(us)
        if len(self._buf) >= FLUSH_AT:
            self.flush()

    def add_many(self, values: Any) -> None:
        """Many values at once (a numpy array or a sequence of ints)."""
        self.flush()
        self._fold(np.asarray(values, dtype=np.int64))

    def flush(self) -> None:
        if self._buf:
            v = np.frombuffer(self._buf, dtype=np.int64).copy()
            self._buf = array("q")
            self._fold(v)

    def _fold(self, v: Any) -> None:
        if v.size == 0:
            return
        h = self.h
        v = np.clip(v, 1, HIST_MAX_US)
        # hdrh's _counts_index_for, vectorised: bucket from the bit length of value|mask
        # (frexp's exponent is the bit length for integers below 2**53).
        pow2ceiling = np.frexp((v | h.sub_bucket_mask).astype(np.float64))[1].astype(np.int64)
        bucket = pow2ceiling - h.unit_magnitude - (h.sub_bucket_half_count_magnitude + 1)
        sub = v >> (bucket + h.unit_magnitude)
        idx = ((bucket + 1) << h.sub_bucket_half_count_magnitude) + sub - h.sub_bucket_half_count
        np.add.at(self._counts, idx, 1)
        h.total_count += int(v.size)
        h.min_value = min(h.min_value, int(v.min()))
        h.max_value = max(h.max_value, int(v.max()))

    @property
    def hist(self) -> Any:
        """The HdrHistogram, up to date."""
        self.flush()
        return self.h

    def count(self) -> int:
        return int(self.h.total_count) + len(self._buf)

    def percentiles_ms(self) -> dict[str, float]:
        h = self.hist
        if h.get_total_count() == 0:
            return {k: 0.0 for k in (*PERCENTILES, "max", "mean")}
        values = h.get_percentile_to_value_dict(list(PERCENTILES.values()))
        out = {k: values[q] / 1000 for k, q in PERCENTILES.items()}
        out["max"] = h.get_max_value() / 1000
        out["mean"] = round(h.get_mean_value() / 1000, 3)
        return out

    def value_at_ms(self, q: float) -> float:
        h = self.hist
        return float(h.get_value_at_percentile(q)) / 1000 if h.get_total_count() else 0.0

    def cdf_ms(self, points: Iterable[float]) -> list[list[float]]:
        h = self.hist
        if h.get_total_count() == 0:
            return []
        qs = sorted(set(points))
        values = h.get_percentile_to_value_dict(qs)
        return [[values[q] / 1000, float(q)] for q in qs if q in values]


class StepRecorder:
    """Counts and latencies of one step; deliveries may arrive from MQTT client threads.

    Latency samples are per delivery (batch x viewer). Three kinds go in `hist`:
    - delivered: receipt minus scheduled time (exact);
    - not sent: the generator gave up sending at `stop` (the send window's end): recorded at
      stop - scheduled for each viewer it would have reached, a lower bound;
    - sent, never delivered: recorded at (drain end or expiry) - scheduled, a lower bound.
    A percentile at or above the smallest lower-bound sample may itself be only a lower bound
    (the true values of those samples are larger); `lower_bound()` says which.
    """

    def __init__(
        self, index: int, patients: int, target_rate: float, t0_ns: int, late_ms: float = 50.0
    ) -> None:
        self.index = index
        self.patients = patients
        self.target_rate = target_rate
        self.t0_ns = t0_ns
        self.late_us = int(late_ms * 1000)
        self.scheduled = 0
        self.sent = 0
        self.unsent = 0
        self.expected = 0
        self.delivered = 0
        self.duplicates = 0
        self.late = 0  # delivered, but later than late_ms
        self.censored_unsent = 0  # latency samples of batches never sent
        self.censored_undelivered = 0  # latency samples of batches sent, never delivered
        self.expired = 0  # of those, counted when EXPIRE_S passed (before the drain ended)
        self.censored_min_us = HIST_MAX_US + 1
        self.last_delivery_ns = 0
        self.send_end_ns = 0
        self.hist = Hist(3)
        # How late the generator itself sent (timer wake-ups, its loop, a blocked write on the
        # same stream), so a reader can tell the generator's share of the latency.
        self.send_lag = Hist(2)
        # How late the generator's event loop ran a 10 ms timer: its own busyness alone.
        self.loop_lag = Hist(2)
        # Round trip of a health check on the system under test during the step (its event
        # loop serves those too: a busy or stalled server answers late).
        self.server_rtt = Hist(2)
        self.server_rtt_timeouts = 0
        self.sent_by_s: dict[int, int] = {}
        self.delivered_by_s: dict[int, int] = {}
        self.p99_by_s: dict[int, float] = {}
        self._open_s: dict[int, array[int]] = {}
        self._latest_s = 0
        self.lock = threading.Lock()

    # -- sending ---------------------------------------------------------------------------
    def on_sent(self, sched_ns: int, viewers: int, now_ns: int) -> None:
        self.sent += 1
        self.send_lag.add(min(max(1, (now_ns - sched_ns) // 1000), HIST_MAX_US))
        self.expected += viewers
        s = (sched_ns - self.t0_ns) // 1_000_000_000
        self.sent_by_s[s] = self.sent_by_s.get(s, 0) + 1

    def on_unsent(self, dues_ns: Sequence[int] | Any, viewers: int, stop_ns: int) -> None:
        """Batches due at `dues_ns` that were never sent (sending stopped at `stop_ns`)."""
        dues = np.asarray(dues_ns, dtype=np.int64)
        self.unsent += int(dues.size)
        if dues.size == 0 or viewers == 0:
            return
        us = np.clip((stop_ns - dues) // 1000, 1, HIST_MAX_US)
        with self.lock:
            self.censored_unsent += int(dues.size) * viewers
            self.censored_min_us = min(self.censored_min_us, int(us.min()))
            self.hist.add_many(np.repeat(us, viewers))

    # -- receiving -------------------------------------------------------------------------
    def on_delivered(self, sched_ns: int, now_ns: int) -> None:
        us = min(max(1, (now_ns - sched_ns) // 1000), HIST_MAX_US)
        s = (now_ns - self.t0_ns) // 1_000_000_000
        with self.lock:
            self.delivered += 1
            if now_ns > self.last_delivery_ns:
                self.last_delivery_ns = now_ns
            self.hist.add(us)
            if us > self.late_us:
                self.late += 1
            if us >= HIST_MAX_US:  # at the cap: "60 s or more"
                self.censored_min_us = min(self.censored_min_us, us)
            vals = self._open_s.get(s)
            if vals is None:
                vals = self._open_s[s] = array("q")
                if s > self._latest_s:
                    self._latest_s = s
                    self._close_seconds(s - 3)
            vals.append(us)

    def on_undelivered(self, sched_ns: int, now_ns: int, expired: bool = False) -> None:
        """A (batch, viewer) sent but not received by `now_ns` (drain end or expiry)."""
        us = min(max(1, (now_ns - sched_ns) // 1000), HIST_MAX_US)
        with self.lock:
            self.censored_undelivered += 1
            self.expired += int(expired)
            self.censored_min_us = min(self.censored_min_us, us)
            self.hist.add(us)

    def _close_seconds(self, upto: int) -> None:
        """Per-second p99 of seconds no delivery can still land in (kept as one number each)."""
        for s in [k for k in self._open_s if k <= upto]:
            vals = self._open_s.pop(s)
            self.delivered_by_s[s] = len(vals)
            self.p99_by_s[s] = float(np.percentile(np.frombuffer(vals, dtype=np.int64), 99)) / 1000

    def close(self) -> None:
        with self.lock:
            self._close_seconds(2**62)
            self.hist.flush()

    # -- reading ---------------------------------------------------------------------------
    @property
    def censored(self) -> int:
        return self.censored_unsent + self.censored_undelivered

    def latency_ms(self) -> dict[str, float]:
        with self.lock:
            return self.hist.percentiles_ms()

    def lower_bound(self, latency_ms: dict[str, float]) -> dict[str, bool]:
        """Which of the figures may be higher in truth: a percentile whose value reaches the
        smallest lower-bound sample; max and mean whenever there is any such sample."""
        if self.censored == 0 and self.censored_min_us > HIST_MAX_US:
            return {k: False for k in latency_ms}
        floor_ms = self.censored_min_us / 1000
        out = {k: v >= floor_ms for k, v in latency_ms.items()}
        out["max"] = out["mean"] = True
        return out


@dataclass
class Segment:
    """One step's batches of one patient: seqs first_seq.., the k-th due at start + k*period."""

    first_seq: int
    start_ns: int
    period_ns: int
    count: int
    rec: StepRecorder
    sent: int = 0
    closed: bool = False  # the step's loss has been counted; later arrivals change nothing

    def due(self, seq: int) -> int:
        return self.start_ns + (seq - self.first_seq) * self.period_ns

    def holds(self, seq: int) -> bool:
        return self.first_seq <= seq < self.first_seq + self.sent


NEW, DUPLICATE, TOO_OLD = 1, 0, -1


class SeenWindow:
    """The seqs one viewer of one patient received, at or above `base` (bounded memory).

    Seqs below `base` are settled: received, or counted undelivered when the window moved.
    """

    __slots__ = ("base", "bits")

    def __init__(self) -> None:
        self.base = 1
        self.bits = bytearray()

    def mark(self, seq: int) -> int:
        i = seq - self.base
        if i < 0:
            return TOO_OLD
        bits = self.bits
        if i >= len(bits):
            bits.extend(bytes(i + 256 - len(bits)))
        if bits[i]:
            return DUPLICATE
        bits[i] = 1
        return NEW

    def has(self, seq: int) -> bool:
        i = seq - self.base
        return i < 0 or (i < len(self.bits) and bool(self.bits[i]))

    def advance(self, new_base: int) -> list[int]:
        """Move the window up to `new_base`; return the seqs given up on (never received)."""
        if new_base <= self.base:
            return []
        n = new_base - self.base
        head = self.bits[:n]
        missing = [self.base + i for i in range(n) if i >= len(head) or not head[i]]
        del self.bits[:n]
        self.base = new_base
        return missing


@dataclass
class Patient:
    index: int
    session_id: str
    next_seq: int = 1
    t0_unix_ns: int = 0
    publisher_token: str = ""
    viewer_token: str = ""
    # A renewed publisher token not yet sent in-band on the open stream.
    refresh_token: str = ""
    watched: bool = False
    segments: list[Segment] = field(default_factory=list)
    # Per viewer: which seqs arrived (to tell duplicates from deliveries, and find losses).
    seen: list[SeenWindow] = field(default_factory=list)

    def segment_of(self, seq: int) -> Segment | None:
        for seg in reversed(self.segments):
            if seq >= seg.first_seq:
                return seg if seg.holds(seq) else None
        return None


def memory_growth(
    samples: Sequence[tuple[float, dict[str, float]]],
    skip_s: float = 0.0,
    window_s: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Per process, from (seconds, {process: RSS MiB}) samples: the mean RSS over the first and
    the last window (after `skip_s` of warm-up), their difference, and the least-squares slope
    over everything after the warm-up. window_s 0: a fifth of the span, at most 5 minutes."""
    kept = [(t, row) for t, row in samples if t >= skip_s]
    if len(kept) < 2:
        kept = list(samples)
    if len(kept) < 2:
        return {}
    t_first, t_last = kept[0][0], kept[-1][0]
    span = t_last - t_first
    window = window_s or min(300.0, span / 5)
    names = sorted({n for _, row in kept for n in row})
    out: dict[str, dict[str, float]] = {}
    for name in names:
        pts = [(t, row[name]) for t, row in kept if name in row]
        if len(pts) < 2:
            continue
        first = [v for t, v in pts if t <= pts[0][0] + window] or [pts[0][1]]
        last = [v for t, v in pts if t >= pts[-1][0] - window] or [pts[-1][1]]
        ts = np.array([t for t, _ in pts])
        vs = np.array([v for _, v in pts])
        slope = float(np.polyfit(ts, vs, 1)[0]) if np.ptp(ts) > 0 else 0.0
        f, la = float(np.mean(first)), float(np.mean(last))
        out[name] = {
            "first_mib": round(f, 2),
            "last_mib": round(la, 2),
            "growth_mib": round(la - f, 2),
            "growth_percent": round(100 * (la - f) / f, 2) if f > 0 else 0.0,
            "slope_mib_per_h": round(slope * 3600, 2),
            "window_s": round(window, 2),
            "span_s": round(pts[-1][0] - pts[0][0], 2),
            "samples": len(pts),
        }
    return out


def finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
