"""A synthetic patient face whose skin tone pulses at a known rate (tests, demos, device agent)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

# BGR (or grey) pictures as OpenCV hands them around; cv2's stubs do not keep dtypes.
Frame = NDArray[Any]
# Drawn layers per (size, noise, seed): drawing costs ~15 ms, a frame from layers ~3 ms.
_LAYERS: dict[
    tuple[int, int, float, int],
    tuple[NDArray[np.float32], NDArray[np.float32], list[NDArray[np.float32]]],
] = {}

# Skin in BGR. Blood volume changes absorb mostly green, so the pulse moves G most (as in real
# rPPG signals), B and R a little; amplitudes are a few tenths of a percent to a percent.
SKIN_BGR = np.array([120.0, 150.0, 200.0])
PULSE_GAIN_BGR = np.array([0.004, 0.010, 0.003])


@dataclass(frozen=True)
class SyntheticFace:
    """Frame i of a face clip: a lit face on a plain wall, skin pulsing at pulse_bpm.

    The face is drawn with the light/dark structure (brow, eyes, nose, mouth shading) that
    OpenCV's frontal-face Haar cascade looks for, so the same code finds it as a camera face.
    """

    pulse_bpm: float = 72.0
    width: int = 640
    height: int = 480
    fps: float = 30.0
    # A small sway, so the face box tracks a moving target as it would with a real patient.
    sway_px: float = 3.0
    noise_sigma: float = 2.0
    seed: int = 0
    label_frames: bool = False
    # Scales the pulse's colour change (PULSE_GAIN_BGR); 0 is a face with no pulse at all.
    pulse_gain: float = 1.0

    def frame(self, i: int) -> Frame:
        t = i / self.fps
        base, skin_mask, noise = self._layers()
        pulse = math.sin(2 * math.pi * (self.pulse_bpm / 60.0) * t)
        # Only skin pulses: the wall, hair, eyes and lips keep their colour.
        gain = PULSE_GAIN_BGR * self.pulse_gain * pulse
        img = base * (1.0 + skin_mask * gain.astype(np.float32))
        dx = self.sway_px * math.sin(2 * math.pi * 0.2 * t)
        dy = self.sway_px * 0.5 * math.cos(2 * math.pi * 0.15 * t)
        if dx or dy:
            shift = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], dtype=np.float32)
            img = cv2.warpAffine(
                img, shift, (self.width, self.height), borderMode=cv2.BORDER_REPLICATE
            )
        if self.noise_sigma > 0:
            img = img + noise[i % len(noise)]
        out = np.clip(img, 0, 255).astype(np.uint8)
        if self.label_frames:
            draw_frame_counter(out, i)
        return out

    def _layers(self) -> tuple[NDArray[np.float32], NDArray[np.float32], list[NDArray[np.float32]]]:
        cached = _LAYERS.get(self._key())
        if cached is None:
            cached = self._draw()
            _LAYERS[self._key()] = cached
        return cached

    def _key(self) -> tuple[int, int, float, int]:
        return (self.width, self.height, self.noise_sigma, self.seed)

    def _draw(self) -> tuple[NDArray[np.float32], NDArray[np.float32], list[NDArray[np.float32]]]:
        img = np.empty((self.height, self.width, 3), dtype=np.float32)
        img[:] = (90.0, 100.0, 105.0)  # a grey-blue wall
        mask = np.zeros((self.height, self.width), dtype=np.float32)
        s = min(self.width, self.height) / 480.0
        c = (self.width // 2, self.height // 2)
        skin = tuple(float(v) for v in SKIN_BGR)
        ax, ay = int(105 * s), int(140 * s)
        # hair, neck, face
        cv2.ellipse(img, (c[0], c[1] - int(40 * s)), (ax + int(12 * s), ay), 0, 180, 360,
                    (40, 50, 60), -1)  # fmt: skip
        neck = ((c[0] - int(45 * s), c[1] + int(100 * s)), (c[0] + int(45 * s), self.height))
        cv2.rectangle(img, *neck, tuple(v * 0.9 for v in skin), -1)
        cv2.rectangle(mask, *neck, 1.0, -1)
        cv2.ellipse(img, c, (ax, ay), 0, 0, 360, skin, -1)
        cv2.ellipse(mask, c, (ax, ay), 0, 0, 360, 1.0, -1)
        dark = tuple(v * 0.35 for v in skin)
        shade = tuple(v * 0.8 for v in skin)
        for side in (-1, 1):
            ex = c[0] + side * int(42 * s)
            ey = c[1] - int(25 * s)
            brow = ((ex - int(26 * s), ey - int(24 * s)), (ex + int(26 * s), ey - int(26 * s)))
            cv2.line(img, *brow, dark, max(1, int(8 * s)))
            cv2.line(mask, *brow, 0.0, max(1, int(8 * s)))
            eye = ((ex, ey), (int(24 * s), int(11 * s)), 0, 0, 360)
            cv2.ellipse(img, *eye, (235, 235, 235), -1)
            cv2.ellipse(mask, *eye, 0.0, -1)
            cv2.circle(img, (ex, ey), int(10 * s), (40, 30, 30), -1)
            # eye sockets are darker than cheeks: what Haar features key on
            cv2.ellipse(
                img, (ex, ey + int(18 * s)), (int(26 * s), int(6 * s)), 0, 0, 360, shade, -1
            )
        nose = np.array(
            [[c[0], c[1] - int(10 * s)], [c[0] - int(14 * s), c[1] + int(38 * s)],
             [c[0] + int(14 * s), c[1] + int(38 * s)]], dtype=np.int32)  # fmt: skip
        cv2.fillPoly(img, [nose], shade)
        mouth = ((c[0], c[1] + int(75 * s)), (int(38 * s), int(12 * s)), 0, 0, 360)
        cv2.ellipse(img, *mouth, (70, 70, 150), -1)
        cv2.ellipse(mask, *mouth, 0.0, -1)
        # a soft face rather than flat fills: closer to a camera picture
        img = cv2.GaussianBlur(img, (0, 0), 1.5 * s).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        # A small bank of noise fields, cycled: sensor noise without its per-frame cost.
        noise = [rng.normal(0.0, self.noise_sigma, img.shape).astype(np.float32) for _ in range(7)]
        return img, mask[:, :, None], noise

    def frames(self, count: int | None = None) -> Iterator[Frame]:
        i = 0
        while count is None or i < count:
            yield self.frame(i)
            i += 1

    def write_y4m(self, path: Path, seconds: float) -> Path:
        """A raw YUV4MPEG2 clip, the format Chromium's --use-file-for-fake-video-capture plays."""
        n = max(1, round(seconds * self.fps))
        fps_num = round(self.fps * 1000)
        with path.open("wb") as f:
            f.write(
                f"YUV4MPEG2 W{self.width} H{self.height} F{fps_num}:1000 Ip A1:1 C420jpeg\n".encode()
            )
            for frame in self.frames(n):
                f.write(b"FRAME\n")
                f.write(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
        return path


# Frame counter as 16 black/white squares in the top-left corner: survives VP8 compression and
# scaling to half size, so a receiver can read back which frame it is showing (latency bench).
COUNTER_BITS = 16
COUNTER_CELL = 16


def draw_frame_counter(img: Frame, value: int) -> None:
    for b in range(COUNTER_BITS):
        on = (value >> b) & 1
        x0 = b * COUNTER_CELL
        img[0:COUNTER_CELL, x0 : x0 + COUNTER_CELL] = 255 if on else 0


def read_frame_counter(img: Frame) -> int:
    """The value drawn by draw_frame_counter, from a frame of the same or a proportional size."""
    h, w = img.shape[:2]
    scale = w / 640.0
    cell = COUNTER_CELL * scale
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    value = 0
    for b in range(COUNTER_BITS):
        y = int(cell / 2)
        x = int(b * cell + cell / 2)
        if y < h and x < w and gray[y, x] > 127:
            value |= 1 << b
    return value
