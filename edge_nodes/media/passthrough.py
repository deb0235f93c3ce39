"""Encoded-frame passthrough: the patient's VP8/H.264 frames forwarded to viewers as they came.

Why (measured with `python -m loadtest.video`: edge and core pinned to one CPU, the peers in
their own process on the other; 640x480@30 two-way calls, figures of patient -> clinician):

  decode + re-encode (aiortc's MediaRelay path, before this module):
      edge adds p50 +25 ms / p95 +97 ms over the direct call, latency builds up within a
      call (p50 88 -> 135 ms from the first to the last 4 s of a 16 s call), the edge process
      uses 46% of its CPU per call, 2 calls carried at >= 25 fps, the third drops to 11 fps.
  after (this module + the niced vision thread, machine load average ~8 from other work):
      direct p50/p95 42.9/57.0 ms, through the edge 43.8/55.3 ms: the edge adds +0.9/-1.7 ms;
      30 fps; no build-up (p50 43.9 -> 44.6 ms); the edge process uses 14% of its CPU per
      call; 4 calls at >= 25 fps (6: 18 fps, with the peers' process and other work sharing).
  the decode path as it is now (media_passthrough false; marker frames and the niced vision
  thread, same load): edge adds +35 ms p50, 42% CPU per call, 1 call at >= 25 fps.
  Tried, kept out: H.264 for the re-encode (aiortc's libx264 settings) costs ~20 ms of CPU per
  640x480 frame against ~2.3 ms for VP8 (aiortc's realtime settings), so VP8 stays the
  fallback's codec. Face detection (~120 ms a run, once a second) shared the edge's core with
  the event loop and showed as p95 spikes: its thread now runs niced (vision_tap.py).

Where the time went on the decode path: (1) aiortc's jitter buffer hands a frame over only when
the first packet of the *next* frame arrives, one frame interval (33 ms at 30 fps) at every
aiortc receiver; (2) a VP8 decode and a full re-encode of every frame per viewer (~2 ms +
~8-15 ms of CPU each, the encoder on the shared default executor); (3) the re-encoder starts
at 500 kb/s and follows REMB, so quality and frame size change under the viewer.

What is here:
- MarkerJitterBuffer completes a frame on its RTP marker bit (the last packet of a frame,
  RFC 7741 / RFC 6184) instead of waiting for the next frame: saves one frame interval at the
  edge, on both paths.
- EncodedTap sits where aiortc hands complete encoded frames to the receiver's decoder
  thread. Every frame goes to the viewers' feeds as-is; the decoder only gets frames while
  someone wants decoded pictures (vision's sampled copy, or a viewer in reduced mode whose
  video must be scaled down and re-encoded), restarting at a keyframe.
- A viewer's feed starts at a keyframe (asking the patient's device for one with an RTCP PLI),
  keeps at most FEED_DEPTH frames (an encoded stream cannot skip single frames the way decoded
  pictures can: a dropped frame breaks the frames referring to it), and on overflow drops all
  and restarts at the next keyframe, so delay cannot build up. A viewer's own PLI is passed
  upstream to the patient.
- The edge's sender packetizes the frames (aiortc's RTCRtpSender takes av.Packet as well as
  frames: encoder.pack instead of encoder.encode).
The decode path stays as the fallback: `media_passthrough: false`, a viewer whose negotiated
codec differs from the patient's, and reduced mode.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import RtpPacket

log = logging.getLogger(__name__)

# Frames a viewer's feed holds before it starts over at a keyframe (~130 ms at 30 fps).
FEED_DEPTH = 4
# Encoded frames waiting for the receiver's decoder thread (vision, reduced-mode viewers);
# past this the decoder is behind: drop what waits and restart at a keyframe (~260 ms).
DECODE_DEPTH = 8
# Keyframe requests to one device are spaced at least this far apart.
PLI_INTERVAL_S = 0.3


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, also completing a frame as soon as its marker packet is in
    and every packet before it since the last frame is present. With every_packet (audio: one
    Opus frame per packet), each packet is a frame at once; aiortc's own audio buffer holds
    four frames (80 ms) before the first, which the edge does not need when it only forwards:
    the listener's jitter buffer smooths the audio."""

    ssrc: int | None = None

    def __init__(self, capacity: int, is_video: bool = False, every_packet: bool = False) -> None:
        super().__init__(capacity, is_video=is_video)
        self._every_packet = every_packet

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self.ssrc = packet.ssrc
        return super().add(packet)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        frame = super()._remove_frame(sequence_number)
        if frame is not None or self._origin is None:
            return frame
        packets: list[RtpPacket] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None
            packets.append(packet)
            if packet.marker or self._every_packet:
                self.remove(count + 1)
                return JitterFrame(
                    data=b"".join(p._data for p in packets),  # type: ignore[attr-defined]
                    timestamp=packet.timestamp,
                )
        return None


def is_keyframe(codec_name: str, data: bytes) -> bool:
    """Whether a depayloaded frame decodes on its own (VP8 key frame, H.264 IDR or SPS; every
    audio frame)."""
    if codec_name not in ("VP8", "H264"):
        return True
    if not data:
        return False
    if codec_name == "VP8":
        return not data[0] & 0x01  # frame tag: bit 0 is 0 for a key frame
    if codec_name == "H264":
        i = data.find(b"\x00\x00\x01")
        while i >= 0 and i + 3 < len(data):
            if data[i + 3] & 0x1F in (5, 7):
                return True
            i = data.find(b"\x00\x00\x01", i + 3)
    return False


@dataclass(frozen=True)
class Encoded:
    codec: str
    data: bytes
    keyframe: bool
    # RTP timestamp of the source (aiortc's mapping: starts near 0), in the codec's clock.
    timestamp: int


class EncodedFeed:
    """One viewer's queue of encoded frames: starts at a keyframe, bounded, restarts on overflow."""

    def __init__(self, tap: EncodedTap) -> None:
        self._tap = tap
        self._frames: deque[Encoded] = deque()
        self._ready = asyncio.Event()
        self.synced = False
        self.restarts = 0
        self.closed = False

    def offer(self, e: Encoded) -> None:
        if not self.synced:
            if not e.keyframe:
                if self.restarts:  # waiting out a restart: this frame is lost to the viewer
                    self._tap.dropped("restart", 1)
                self._tap.request_keyframe()
                return
            self.synced = True
        if len(self._frames) >= FEED_DEPTH:
            # Behind: skipping inside a GOP would corrupt the picture; start over at a keyframe.
            self._tap.dropped("behind", len(self._frames))
            self._frames.clear()
            self.synced = False
            self.restarts += 1
            self._tap.request_keyframe()
            if not e.keyframe:
                self._tap.dropped("restart", 1)
                return
            self.synced = True
        self._frames.append(e)
        self._ready.set()

    async def get(self) -> Encoded:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    def close(self) -> None:
        self.closed = True
        self._tap.feeds.discard(self)


class EncodedTap(queue.Queue[Any]):
    """Replaces a video receiver's decoder queue: frames go to feeds, and to the decoder while
    decoded pictures are wanted. put() runs on the event loop (aiortc's RTP handler)."""

    def __init__(self, receiver: RTCRtpReceiver, jitter: MarkerJitterBuffer) -> None:
        super().__init__()
        self._receiver = receiver
        self._jitter = jitter
        self.feeds: set[EncodedFeed] = set()
        self.codec = ""
        self.frames = 0
        # Readers of decoded pictures (vision, reduced-mode viewers); decode only while > 0.
        self.decoded_readers = 0
        self._decoder_synced = False
        self._restarting = False
        self._pli_at = -1e9
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_frame: Callable[[], None] | None = None
        # Frames dropped on the way to viewers or the decoder, by reason (metrics).
        self.on_drop: Callable[[str, int], None] | None = None
        self.decoder_restarts = 0

    def dropped(self, reason: str, n: int) -> None:
        if n > 0 and self.on_drop is not None:
            self.on_drop(reason, n)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:  # the receiver stopping its decoder thread
            super().put(item, block, timeout)
            return
        codec: RTCRtpCodecParameters = item[0]
        frame: JitterFrame = item[1]
        self.codec = codec.name
        key = is_keyframe(codec.name, frame.data)
        self.frames += 1
        if self.on_frame is not None:
            self.on_frame()
        if self.feeds:
            e = Encoded(codec.name, frame.data, key, frame.timestamp)
            for feed in list(self.feeds):
                feed.offer(e)
        if self.decoded_readers > 0:
            if self._decoder_synced and self.qsize() >= DECODE_DEPTH:
                # The decoder thread is behind (CPU burst): queueing more only adds delay for
                # vision and reduced-mode viewers. Drop what waits, restart at a keyframe.
                self._drain()
                self._decoder_synced = False
                self._restarting = True
                self.decoder_restarts += 1
            if not self._decoder_synced:
                if not key:
                    if self._restarting:  # lost to the decoder, like those drained
                        self.dropped("decoder_behind", 1)
                    self.request_keyframe()
                    return
                self._decoder_synced = True
                self._restarting = False
            super().put(item, block, timeout)
        else:
            self._decoder_synced = False

    def _drain(self) -> None:
        """Take the waiting frames away from the decoder (never the stop sentinel)."""
        with self.mutex:
            kept = [i for i in self.queue if i is None]
            n = len(self.queue) - len(kept)
            self.queue.clear()
            self.queue.extend(kept)
        self.dropped("decoder_behind", n)

    def subscribe(self) -> EncodedFeed:
        feed = EncodedFeed(self)
        self.feeds.add(feed)
        self.request_keyframe()
        return feed

    def request_keyframe(self) -> None:
        """Ask the sending device for a keyframe (RTCP PLI), at most every PLI_INTERVAL_S."""
        now = time.monotonic()
        ssrc = self._jitter.ssrc
        if not self._jitter._is_video or ssrc is None or now - self._pli_at < PLI_INTERVAL_S:
            return
        self._pli_at = now
        task = asyncio.get_running_loop().create_task(self._receiver._send_rtcp_pli(ssrc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def use_marker_jitter_buffer(receiver: RTCRtpReceiver, kind: str) -> MarkerJitterBuffer:
    """Give a receiver the frame-completing jitter buffer (before any packet arrives)."""
    if kind == "video":
        jitter = MarkerJitterBuffer(capacity=512, is_video=True)
    else:
        jitter = MarkerJitterBuffer(capacity=16, every_packet=True)
    receiver._RTCRtpReceiver__jitter_buffer = jitter  # type: ignore[attr-defined]
    return jitter


def install_tap(receiver: RTCRtpReceiver, jitter: MarkerJitterBuffer) -> EncodedTap:
    """Put the tap into a video receiver before it starts (its decoder thread takes the queue
    when the connection comes up)."""
    tap = EncodedTap(receiver, jitter)
    receiver._RTCRtpReceiver__decoder_queue = tap  # type: ignore[attr-defined]
    return tap


def forward_keyframe_requests(sender: RTCRtpSender, request: Any) -> None:
    """A viewer's PLI/FIR to the edge's sender also asks the source for a keyframe (in
    passthrough the edge has no encoder of its own to make one)."""
    own = sender._send_keyframe

    def send_keyframe() -> None:
        own()
        request()

    sender._send_keyframe = send_keyframe  # type: ignore[method-assign]
