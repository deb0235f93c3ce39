"""Brightness, blur and face-in-view on synthetic pictures with known answers."""

from __future__ import annotations

import cv2
import numpy as np

from edge_nodes.vision.analyzer import FrameAnalyzer
from edge_nodes.vision.hints import HintKind, hint_for
from edge_nodes.vision.quality import FaceDetector, brightness, sharpness
from edge_nodes.vision.synthetic import SyntheticFace, draw_frame_counter, read_frame_counter


def test_brightness_of_black_white_and_grey() -> None:
    assert brightness(np.zeros((48, 64, 3), np.uint8)) == 0.0
    assert brightness(np.full((48, 64, 3), 255, np.uint8)) == 255.0
    assert abs(brightness(np.full((48, 64, 3), 100, np.uint8)) - 100.0) < 1.0


def test_blur_lowers_sharpness() -> None:
    face = SyntheticFace(noise_sigma=0).frame(0)
    blurred = cv2.GaussianBlur(face, (0, 0), 6)
    assert sharpness(blurred) < sharpness(face) / 4


def test_face_found_in_synthetic_face_and_not_in_empty_wall() -> None:
    detector = FaceDetector()
    face = SyntheticFace().frame(0)
    box = detector.largest_face(face)
    assert box is not None
    # the drawn face is centred in the frame
    assert abs(box.x + box.w / 2 - 320) < 40 and abs(box.y + box.h / 2 - 240) < 60
    wall = np.full((480, 640, 3), (90, 100, 105), np.uint8)
    assert detector.largest_face(wall) is None


def test_face_found_at_phone_and_hd_sizes() -> None:
    detector = FaceDetector()
    for w, h in ((360, 640), (1280, 720)):
        assert detector.largest_face(SyntheticFace(width=w, height=h).frame(5)) is not None


def test_hints_put_light_first_then_face_then_blur() -> None:
    assert hint_for(20, 500, True) is HintKind.TOO_DARK
    assert hint_for(240, 500, True) is HintKind.TOO_BRIGHT
    assert hint_for(120, 500, False) is HintKind.FACE_NOT_IN_VIEW
    assert hint_for(120, 5, True) is HintKind.BLURRY
    assert hint_for(120, 500, True) is HintKind.GOOD


def test_analyzer_says_too_dark_for_a_dim_face() -> None:
    analyzer = FrameAnalyzer()
    dim = (SyntheticFace().frame(0) * 0.2).astype(np.uint8)
    assert analyzer.analyse(dim, 0.0).kind is HintKind.TOO_DARK


def test_analyzer_says_face_not_in_view_after_the_face_leaves() -> None:
    analyzer = FrameAnalyzer(detect_every_s=0.0)
    clip = SyntheticFace()
    assert analyzer.analyse(clip.frame(0), 0.0).kind is HintKind.GOOD
    wall = np.full((480, 640, 3), (120, 130, 135), np.uint8)
    analyzer.analyse(wall, 0.1)
    result = analyzer.analyse(wall, 0.2)
    assert result.kind is HintKind.FACE_NOT_IN_VIEW and not result.face_in_view


def test_frame_counter_reads_back_at_full_and_half_size() -> None:
    img = SyntheticFace().frame(0)
    draw_frame_counter(img, 40_961)
    assert read_frame_counter(img) == 40_961
    half = cv2.resize(img, (320, 240), interpolation=cv2.INTER_AREA)
    assert read_frame_counter(half) == 40_961


def test_analyzer_says_blurred_for_a_defocused_face() -> None:
    analyzer = FrameAnalyzer()
    face = SyntheticFace().frame(0)
    assert analyzer.analyse(face, 0.0).kind is HintKind.GOOD
    defocused = cv2.GaussianBlur(face, (0, 0), 4)
    assert analyzer.analyse(defocused, 0.1).kind is HintKind.BLURRY
