"""One relayed frame, many readers: nobody converts it off the loop, nobody changes it.

The crash this guards against (audit of issue 3, #3): PyAV caches one libswscale context on a
frame; vision converting the relayed frame in its thread while the event loop scaled the same
frame for a reduced-mode viewer hung or segfaulted the edge. The stress test runs in a child
process, so a segfault or a hang fails the test (by exit code or timeout) instead of taking
pytest down.
"""

from __future__ import annotations

import fractions
import subprocess
import sys
import textwrap

import numpy as np
from aiortc.contrib.media import MediaRelay
from av import AudioFrame, VideoFrame
from av.video.frame import PictureType

from edge_nodes.media.frames import VisionSample, own_audio_frame, own_video_frame
from edge_nodes.media.quality import CallMode
from edge_nodes.media.tracks import ForwardedTrack
from edge_nodes.vision.synthetic import SyntheticFace


def relayed_frame(width: int = 640, height: int = 480) -> VideoFrame:
    img = SyntheticFace(width=width, height=height).frame(0)
    frame = VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuv420p")
    frame.pts = 1234
    frame.time_base = fractions.Fraction(1, 90_000)
    return frame


def test_each_viewer_gets_its_own_frame_and_the_relayed_one_is_left_alone() -> None:
    shared = relayed_frame()
    before = shared.to_ndarray().copy()
    for mode in (CallMode.FULL, CallMode.REDUCED):
        fwd = ForwardedTrack("video", MediaRelay())
        fwd.set_mode(mode)
        fwd._key_next = True
        out = fwd._shape(shared)
        assert isinstance(out, VideoFrame) and out is not shared
        out.pict_type = PictureType.I  # what the keyframe path and aiortc's encoder do
        assert shared.pts == 1234 and shared.time_base == fractions.Fraction(1, 90_000)
        assert shared.pict_type != PictureType.I
        if mode is CallMode.REDUCED:
            assert (out.width, out.height) == (320, 240)
        else:
            assert np.array_equal(out.to_ndarray(), before)
    assert np.array_equal(shared.to_ndarray(), before)


def test_copies_keep_the_picture_and_timing_for_odd_sizes_and_audio() -> None:
    odd = VideoFrame.from_ndarray(SyntheticFace(width=161, height=121).frame(0), format="bgr24")
    odd.pts = 7
    own = own_video_frame(odd)
    assert own is not odd and own.format.name == "yuv420p" and own.pts == 7
    sample = VisionSample.take(odd)
    assert sample.bgr().shape == (121, 161, 3)
    shared = relayed_frame(320, 240)
    bgr = VisionSample.take(shared).bgr()
    direct = shared.to_ndarray(format="bgr24")
    assert bgr.shape == direct.shape
    # OpenCV's and libswscale's YUV->BGR differ by rounding only.
    assert float(np.abs(bgr.astype(int) - direct.astype(int)).mean()) < 3.0
    audio = AudioFrame(format="s16", layout="stereo", samples=960)
    for p in audio.planes:
        p.update(bytes(p.buffer_size))
    audio.sample_rate, audio.pts = 48_000, 960
    a = own_audio_frame(audio)
    assert a is not audio and (a.samples, a.sample_rate, a.pts) == (960, 48_000, 960)


STRESS = textwrap.dedent(
    """
    import time, fractions
    from concurrent.futures import ThreadPoolExecutor
    from aiortc.codecs import get_encoder
    from aiortc.contrib.media import MediaRelay
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters
    from av import VideoFrame
    from edge_nodes.media.frames import VisionSample
    from edge_nodes.media.quality import CallMode
    from edge_nodes.media.tracks import ForwardedTrack
    from edge_nodes.media.vision_tap import _analyse
    from edge_nodes.vision.analyzer import FrameAnalyzer
    from edge_nodes.vision.synthetic import SyntheticFace

    face = SyntheticFace(width=640, height=480)
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000)
    # One thread per actor, as at the edge: each analyzer and each encoder is used serially.
    analyzers = [(FrameAnalyzer(15.0), ThreadPoolExecutor(1)) for _ in range(3)]
    full, reduced = ForwardedTrack("video", MediaRelay()), ForwardedTrack("video", MediaRelay())
    reduced.set_mode(CallMode.REDUCED)
    senders = [(fwd, get_encoder(vp8), ThreadPoolExecutor(1)) for fwd in (full, reduced)]
    pending = []
    deadline = time.monotonic() + 4.0
    i = 0
    while time.monotonic() < deadline:
        # What the relay does: one decoded frame object for every reader.
        img = face.frame(i % 30)
        frame = VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuv420p")
        frame.time_base = fractions.Fraction(1, 90000)
        for _ in range(4):
            # vision samples the frame (three worker threads here; the edge has one) ...
            for k, (a, pool) in enumerate(analyzers):
                pending.append(pool.submit(_analyse, a, VisionSample.take(frame), i / 15 + k))
            # ... while the loop shapes it for a full and a reduced viewer, whose encoders run
            # in executor threads exactly as aiortc's RTCRtpSender runs them.
            for fwd, enc, pool in senders:
                fwd._last_sent = 0.0
                out = fwd._shape(frame)
                pending.append(pool.submit(enc.encode, out, i % 10 == 0))
            # and the loop itself converts the shared frame meanwhile (other readers do).
            frame.reformat(width=320, height=240)
            frame.to_ndarray(format="bgr24")
            i += 1
        while len(pending) > 24:
            pending.pop(0).result()
    for f in pending:
        f.result()
    print("ok", i)
    """
)


def test_many_threads_use_samples_while_the_loop_reformats_the_shared_frame() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", STRESS],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout
