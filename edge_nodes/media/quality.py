"""Call modes for poor links and a busy edge, as pure functions and small state machines.

Two things lower a call's quality: its own link (loss and round-trip time measured from RTCP)
and the edge's video budget. The budget is shared by priority: calls whose patient's NEWS2 band
is medium or high keep full quality ahead of the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum


class CallMode(IntEnum):
    # Values match telehealth.v1.CallMode; a larger value forwards less.
    FULL = 1
    REDUCED = 2
    AUDIO_ONLY = 3

    def step_down(self) -> CallMode:
        return CallMode(min(self + 1, CallMode.AUDIO_ONLY))

    def step_up(self) -> CallMode:
        return CallMode(max(self - 1, CallMode.FULL))


# REDUCED forwards half width, half height and at most this frame rate: an eighth of the pixels.
REDUCED_SCALE = 2
REDUCED_MAX_FPS = 15.0
# NEWS2 risk band values (telehealth.v1.RiskBand) that keep video quality first.
PRIORITY_BANDS = frozenset({3, 4})


@dataclass(frozen=True)
class LinkSample:
    """One second of a link as RTCP reports it, audio and video together.

    `packets` is the evidence: RTP packets expected on the link in that second (received +
    lost). A second with too few (the peer sent nothing, or only RTCP) says nothing about the
    link, so it moves the controller neither down nor up: otherwise a link carrying only audio,
    or nothing at all, would look loss-free and climb back to full video blindly.
    """

    loss_fraction: float
    rtt_s: float | None
    packets: int = 1_000


# Fewer packets than this in a second is no evidence (Opus alone sends 50 a second).
MIN_EVIDENCE_PACKETS = 10


@dataclass(frozen=True)
class LinkThresholds:
    reduce_loss: float = 0.05
    reduce_rtt_s: float = 0.4
    audio_only_loss: float = 0.20
    audio_only_rtt_s: float = 1.2
    good_loss: float = 0.02
    good_rtt_s: float = 0.25
    # Consecutive bad seconds before stepping down, good seconds before stepping up. Up is
    # slower than down so a recovering link does not flap between modes.
    bad_seconds: int = 2
    good_seconds: int = 5
    # A link that falls again within flap_window_s of climbing up must stay good twice as
    # long before the next climb (up to max_good_seconds); a mode held that long resets it.
    flap_window_s: int = 30
    max_good_seconds: int = 60


class LinkModeController:
    """Hysteresis over LinkSamples: down fast on a bad link, up one step at a time when good,
    and slower each time a climb turns out premature (a flapping link settles low)."""

    def __init__(self, thresholds: LinkThresholds = LinkThresholds()) -> None:
        self.t = thresholds
        self.mode = CallMode.FULL
        self._bad = 0
        self._good = 0
        self.reason = "link is good"
        # Seconds of good link needed before the next step up (grows while flapping).
        self.hold_s = thresholds.good_seconds
        self._now = 0  # seconds of evidence seen
        self._climbed_at: int | None = None
        self._changed_at = 0

    def update(self, s: LinkSample) -> CallMode:
        t = self.t
        if s.packets < MIN_EVIDENCE_PACKETS:
            return self.mode
        self._now += 1
        rtt = s.rtt_s if s.rtt_s is not None else 0.0
        severe = s.loss_fraction >= t.audio_only_loss or rtt >= t.audio_only_rtt_s
        bad = severe or s.loss_fraction >= t.reduce_loss or rtt >= t.reduce_rtt_s
        good = s.loss_fraction <= t.good_loss and rtt <= t.good_rtt_s
        if bad:
            self._bad += 1
            self._good = 0
        elif good:
            self._good += 1
            self._bad = 0
        else:
            self._bad = self._good = 0
        climbed_last = self._climbed_at is not None and self._climbed_at == self._changed_at
        if climbed_last and self._now - self._changed_at >= t.flap_window_s:
            self.hold_s = t.good_seconds  # a climb that held for a while: trust the link again
        if self._bad >= t.bad_seconds:
            target = CallMode.AUDIO_ONLY if severe else self.mode.step_down()
            if target > self.mode:
                if self._climbed_at is not None and self._now - self._climbed_at < t.flap_window_s:
                    self.hold_s = min(self.hold_s * 2, t.max_good_seconds)
                self.mode = target
                self._changed_at = self._now
                self.reason = (
                    f"poor link: {s.loss_fraction:.0%} packets lost, round trip {rtt * 1000:.0f} ms"
                )
            self._bad = 0
        elif self._good >= self.hold_s and self.mode is not CallMode.FULL:
            self.mode = self.mode.step_up()
            self._climbed_at = self._changed_at = self._now
            self.reason = "link recovered" if self.mode is CallMode.FULL else "link recovering"
            self._good = 0
        return self.mode


@dataclass(frozen=True)
class VideoDemand:
    """A call asking the edge to forward video: pixels/s at full quality, to each viewer."""

    session_id: str
    pixel_rate: float
    viewers: int
    news2_band: int
    started_unix_ns: int

    @property
    def prioritised(self) -> bool:
        return self.news2_band in PRIORITY_BANDS


def reduced_pixel_rate(full: float) -> float:
    return full / (REDUCED_SCALE * REDUCED_SCALE) / 2.0


def allocate(demands: Sequence[VideoDemand], budget: float) -> dict[str, CallMode]:
    """The best mode each call may have within the edge's video budget (pixels/s forwarded).

    Calls are served in priority order: NEWS2 medium/high first, then the rest, older calls
    first within a group. Everyone first gets the cheapest video (REDUCED) if it fits, then
    calls are raised to FULL in the same order, so a priority patient keeps full quality while
    low-risk calls share what is left, and video stops (AUDIO_ONLY) only when even reduced video
    does not fit.
    """
    order = sorted(demands, key=lambda d: (not d.prioritised, d.started_unix_ns, d.session_id))
    modes: dict[str, CallMode] = {}
    used = 0.0
    for d in order:
        cost = reduced_pixel_rate(d.pixel_rate) * max(d.viewers, 1)
        if used + cost <= budget:
            modes[d.session_id] = CallMode.REDUCED
            used += cost
        else:
            modes[d.session_id] = CallMode.AUDIO_ONLY
    for d in order:
        if modes[d.session_id] is not CallMode.REDUCED:
            continue
        extra = (d.pixel_rate - reduced_pixel_rate(d.pixel_rate)) * max(d.viewers, 1)
        if used + extra <= budget:
            modes[d.session_id] = CallMode.FULL
            used += extra
    return modes


def worst(*modes: CallMode) -> CallMode:
    return CallMode(max(modes)) if modes else CallMode.FULL


@dataclass(frozen=True)
class CpuPressure:
    """Measured load on top of the configured pixel budget (which is only an estimate of what
    the edge can forward): while the edge process uses more than `limit` of a core, the budget
    shrinks below what the calls demand, so the lowest-priority ones are asked to send less;
    once the process is well under (`relief` of the limit) the budget grows back by `regrow`
    a second up to the configured one. Smoothing comes from the process's CPU being measured
    over several seconds and from the budget's own recovery hysteresis."""

    limit: float
    relief: float = 0.8
    shrink: float = 0.85
    regrow: float = 1.1


def pressured_budget(
    configured: float,
    previous: float,
    demand: float,
    cpu: float,
    p: CpuPressure,
    settling: bool = False,
) -> float:
    """The pixel budget to allocate with: configured when unloaded, less under CPU pressure.

    demand: pixels/s the calls want at full quality; cpu: the edge process's CPU, in cores,
    over the last few seconds; settling: the budget shrank less than that long ago, so the
    CPU figure does not show its effect yet (no further shrinking on stale evidence)."""
    if p.limit <= 0:
        return configured
    if cpu > p.limit:
        if settling:
            return previous
        return max(1.0, min(previous, demand) * p.shrink)
    if cpu < p.limit * p.relief:
        return min(configured, previous * p.regrow)
    return min(configured, previous)
