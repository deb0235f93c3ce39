"""Private copies of decoded frames: nothing outside the event loop touches a relayed frame.

aiortc's MediaRelay hands the *same* av.VideoFrame object to every reader of a track (each
viewer on the decode path, and vision). That object is not safe to share across threads:
PyAV caches a VideoReformatter (one libswscale context) on the frame the first time
`frame.reformat()` or `frame.to_ndarray(format=...)` runs, and re-initialises that context in
place whenever the next call asks for other parameters; it also rewrites the frame's colour
metadata for the length of each conversion. Two threads converting one frame (vision's worker
making BGR while the event loop scales it for a reduced-mode viewer) therefore run
sws_scale_frame on one context while the other thread rebuilds it - a hang or a segfault
(reproduced: /tmp/audit3/race.py, and tests/unit/test_media_frames.py). The encoders of
aiortc run in executor threads too, and read `pts` while the loop would rewrite it for the
next viewer, and set `pict_type` on the frame they were given.

So the rule at the edge: the relayed frame is read only on the event loop, and everyone who
changes a frame or hands it to another thread gets a copy of their own first:
- `own_video_frame` for a viewer's encoder (a plain copy of the planes, ~0.2 ms for 640x480),
- `own_audio_frame` likewise for audio (a few kB),
- `VisionSample` for vision: the I420 planes copied on the loop, converted to BGR by OpenCV in
  the vision thread on that private array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from av import AudioFrame, VideoFrame
from numpy.typing import NDArray

# The decoders' format, whose planes to_ndarray() copies as they are (no libswscale).
_PLANAR_420 = ("yuv420p",)


def _copyable_420(frame: VideoFrame) -> bool:
    return frame.format.name in _PLANAR_420 and frame.width % 2 == 0 and frame.height % 2 == 0


def own_video_frame(frame: VideoFrame) -> VideoFrame:
    """A new frame with its own buffers and the same picture, pts and time base.

    Must be called on the thread that owns `frame` (the event loop)."""
    if _copyable_420(frame):
        out = VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
    else:
        # Any other layout: one conversion (on the loop) into a new, even-sized yuv420p frame,
        # which is what the VP8/H.264 encoders take anyway.
        out = frame.reformat(
            width=max(2, frame.width // 2 * 2), height=max(2, frame.height // 2 * 2),
            format="yuv420p",
        )  # fmt: skip
        if out is frame:  # PyAV returns the frame itself for a no-op conversion
            out = VideoFrame.from_ndarray(frame.to_ndarray(format="bgr24"), format="bgr24")
    _copy_timing(frame, out)
    return out


def _copy_timing(src: Any, dst: Any) -> None:
    dst.pts = src.pts
    if src.time_base is not None:
        dst.time_base = src.time_base


def own_audio_frame(frame: AudioFrame) -> AudioFrame:
    """A new audio frame with its own samples (the Opus encoder reads it in another thread)."""
    out = AudioFrame.from_ndarray(
        frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name
    )
    out.sample_rate = frame.sample_rate
    _copy_timing(frame, out)
    return out


@dataclass(frozen=True)
class VisionSample:
    """A decoded picture copied for vision: planes taken on the loop, BGR made in the worker."""

    data: NDArray[Any]
    # "i420" (height*3/2 x width planes) or "bgr"
    layout: str

    @classmethod
    def take(cls, frame: VideoFrame) -> VisionSample:
        """Copy `frame` (on the event loop: the only thread that touches relayed frames)."""
        if _copyable_420(frame):
            return cls(frame.to_ndarray(), "i420")
        # Rare (odd sizes, other pixel formats): convert here, on the loop's own reformatter.
        return cls(np.ascontiguousarray(frame.to_ndarray(format="bgr24")), "bgr")

    def bgr(self) -> NDArray[Any]:
        """The picture as BGR (in the vision thread; touches only this sample's own array)."""
        if self.layout == "bgr":
            return self.data
        return cv2.cvtColor(self.data, cv2.COLOR_YUV2BGR_I420)
