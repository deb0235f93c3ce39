"""Turn frame measurements into one plain-words hint for the patient page (pure function)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class HintKind(IntEnum):
    # Values match telehealth.v1.VisionHintKind.
    GOOD = 1
    TOO_DARK = 2
    TOO_BRIGHT = 3
    BLURRY = 4
    FACE_NOT_IN_VIEW = 5


@dataclass(frozen=True)
class Thresholds:
    # Mean luma below this and the clinician sees little; above, the face washes out.
    dark: float = 50.0
    bright: float = 215.0
    # Variance of the Laplacian on a 320-wide copy; a focused face gives tens to hundreds, a
    # defocused one (Gaussian sigma 3 px at 640 wide) single digits.
    blurry: float = 8.0


MESSAGES = {
    HintKind.GOOD: "Your picture looks good.",
    HintKind.TOO_DARK: "Too dark - move towards a light.",
    HintKind.TOO_BRIGHT: "Too bright - move away from the window or lamp behind the camera.",
    HintKind.BLURRY: "The picture is blurred - hold the phone still or wipe the camera.",
    HintKind.FACE_NOT_IN_VIEW: "We cannot see your face - look at the screen.",
}


def hint_for(
    brightness: float, sharpness: float, face_in_view: bool, t: Thresholds = Thresholds()
) -> HintKind:
    """The most useful single thing to tell the patient, light first (it explains the rest)."""
    if brightness < t.dark:
        return HintKind.TOO_DARK
    if brightness > t.bright:
        return HintKind.TOO_BRIGHT
    if not face_in_view:
        return HintKind.FACE_NOT_IN_VIEW
    if sharpness < t.blurry:
        return HintKind.BLURRY
    return HintKind.GOOD
