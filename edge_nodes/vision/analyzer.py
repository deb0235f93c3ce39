"""One session's vision state: quality, face tracking and pulse over sampled frames (blocking)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_nodes.vision.hints import MESSAGES, HintKind, Thresholds, hint_for
from edge_nodes.vision.quality import (
    FaceBox,
    FaceDetector,
    Frame,
    brightness,
    mean_rgb,
    sharpness,
    skin_region,
)
from edge_nodes.vision.rppg import PulseEstimator


@dataclass(frozen=True)
class VisionResult:
    kind: HintKind
    message: str
    brightness: float
    sharpness: float
    face_in_view: bool
    pulse_bpm: float | None


class FrameAnalyzer:
    """Runs in a worker thread, one call at a time; never touched by the event loop.

    Face detection is the expensive step, so it runs about once a second and the box is
    reused in between; the cheap per-frame work is the skin colour mean that rPPG needs.
    """

    def __init__(
        self,
        sample_hz: float = 15.0,
        detect_every_s: float = 1.0,
        thresholds: Thresholds | None = None,
    ) -> None:
        self._detector = FaceDetector()
        self._pulse = PulseEstimator(fs=sample_hz)
        self._detect_every_s = detect_every_s
        self._thresholds = thresholds or Thresholds()
        self._face: FaceBox | None = None
        self._detected_at = -1e9
        self._misses = 0
        self._pulse_at = -1e9
        self._last_pulse: float | None = None

    def analyse(self, frame: Frame, t_s: float) -> VisionResult:
        if t_s - self._detected_at >= self._detect_every_s or self._face is None:
            self._detected_at = t_s
            found = self._detector.largest_face(frame)
            if found is None:
                self._misses += 1
                # One missed detection is often a blink or a turn; two means the face left.
                if self._misses >= 2:
                    self._face = None
                    self._pulse.reset()
                    self._last_pulse = None
            else:
                self._misses = 0
                self._face = found
        if self._face is not None:
            self._pulse.add(t_s, mean_rgb(frame, skin_region(self._face)))
            # The spectrum changes slowly; once a second is plenty and keeps the worker light.
            if t_s - self._pulse_at >= 1.0:
                self._pulse_at = t_s
                self._last_pulse = self._pulse.bpm()
        b = brightness(frame)
        s = sharpness(frame)
        kind = hint_for(b, s, self._face is not None, self._thresholds)
        return VisionResult(kind, MESSAGES[kind], b, s, self._face is not None, self._last_pulse)
