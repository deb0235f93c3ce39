"""Picture quality of one frame as plain numpy-in, numbers-out OpenCV functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

# BGR (or grey) pictures as OpenCV hands them around; cv2's stubs do not keep dtypes.
Frame = NDArray[Any]


@dataclass(frozen=True)
class FaceBox:
    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h


def gray(frame: Frame) -> Frame:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def brightness(frame: Frame) -> float:
    """Mean luma, 0 (black) to 255 (white)."""
    return float(np.mean(gray(frame)))


def sharpness(frame: Frame) -> float:
    """Variance of the Laplacian: edges make it large, blur makes it small (Pech-Pacheco 2000).

    Measured on a 320-pixel-wide copy so the number means the same at any camera resolution.
    """
    g = gray(frame)
    if g.shape[1] > 320:
        g = cv2.resize(g, (320, round(g.shape[0] * 320 / g.shape[1])), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(g, cv2.CV_64F).var())


class FaceDetector:
    """OpenCV's bundled frontal-face Haar cascade; one instance per worker thread."""

    def __init__(self, min_size_fraction: float = 0.12) -> None:
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"cannot load the face cascade at {path}")
        self._min_fraction = min_size_fraction

    def largest_face(self, frame: Frame) -> FaceBox | None:
        """The biggest face in the frame, or None. Works on a 320-wide copy for speed."""
        g = gray(frame)
        scale = 1.0
        if g.shape[1] > 320:
            scale = g.shape[1] / 320.0
            g = cv2.resize(g, (320, round(g.shape[0] / scale)), interpolation=cv2.INTER_AREA)
        g = cv2.equalizeHist(g)
        side = max(24, int(min(g.shape[:2]) * self._min_fraction))
        found = self._cascade.detectMultiScale(
            g, scaleFactor=1.1, minNeighbors=4, minSize=(side, side)
        )
        if len(found) == 0:
            return None
        x, y, w, h = max(found, key=lambda b: int(b[2]) * int(b[3]))
        return FaceBox(round(x * scale), round(y * scale), round(w * scale), round(h * scale))


def skin_region(box: FaceBox) -> FaceBox:
    """The middle of a face box: cheeks and forehead, without hair, background or eyes' edges.

    rPPG averages these pixels, so keeping non-skin out keeps the pulse signal clean.
    """
    return FaceBox(box.x + box.w // 5, box.y + box.h // 8, box.w * 3 // 5, box.h * 3 // 4)


def mean_rgb(frame: Frame, box: FaceBox) -> NDArray[np.float64]:
    """Mean (R, G, B) over a box of a BGR frame."""
    h, w = frame.shape[:2]
    x0, y0 = max(0, box.x), max(0, box.y)
    x1, y1 = min(w, box.x + box.w), min(h, box.y + box.h)
    if x1 <= x0 or y1 <= y0:
        return np.zeros(3)
    b, g, r = cv2.mean(frame[y0:y1, x0:x1])[:3]
    return np.array([r, g, b], dtype=np.float64)
