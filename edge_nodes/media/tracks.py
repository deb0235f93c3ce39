"""Tracks between a peer's receiver and other peers' senders: counted, switchable, mode-aware.

A remote track is read (and so decoded) once by aiortc's MediaRelay; every consumer gets a relay
proxy with buffered=False, which holds only the newest frame: a consumer that falls behind skips
frames instead of queueing them, so delay cannot build up over a long call. With
media_passthrough, video and audio go to viewers still encoded (media/passthrough.py: bounded
feeds that restart at a keyframe) and the receiver decodes only while someone reads pictures.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame
from av.frame import Frame
from av.packet import Packet
from av.video.frame import PictureType

from edge_nodes.media.frames import own_audio_frame, own_video_frame
from edge_nodes.media.passthrough import EncodedFeed, EncodedTap
from edge_nodes.media.quality import REDUCED_MAX_FPS, REDUCED_SCALE, CallMode

VIDEO_CLOCK = fractions.Fraction(1, 90_000)
AUDIO_CLOCK = fractions.Fraction(1, 48_000)
log = logging.getLogger(__name__)


class CountingTrack(MediaStreamTrack):
    """Wraps a remote track: counts frames and measures their rate, reading it for the relay."""

    def __init__(
        self, source: MediaStreamTrack, on_stale: Callable[[int], None] | None = None
    ) -> None:
        super().__init__()
        self.kind = source.kind
        self._source = source
        self.frames = 0
        self.stale = 0
        self._on_stale = on_stale
        self.width = 0
        self.height = 0
        self._arrivals: deque[float] = deque(maxlen=90)
        # Encoded frames of this (video) track, when the edge forwards them without re-encoding.
        self.tap: EncodedTap | None = None

    def want_decoded(self, delta: int) -> None:
        """A reader of decoded pictures comes (+1) or goes (-1): with a tap, the receiver only
        decodes while someone reads."""
        if self.tap is not None:
            self.tap.decoded_readers = max(0, self.tap.decoded_readers + delta)

    async def recv(self) -> Frame | Packet[Any]:
        frame = await self._source.recv()
        # aiortc queues decoded frames without bound; when the edge falls behind (a CPU burst)
        # skip to the newest so delay cannot build up, and count what was skipped.
        queue = getattr(self._source, "_queue", None)
        skipped = 0
        while isinstance(queue, asyncio.Queue) and queue.qsize() > 0:
            newer = queue.get_nowait()
            if newer is None:  # end of the track: deliver what we have, end on the next call
                queue.put_nowait(None)
                break
            frame = newer
            skipped += 1
        if skipped:
            self.stale += skipped
            if self._on_stale is not None:
                self._on_stale(skipped)
        if self.tap is None:  # with a tap, frames are counted as they arrive, decoded or not
            self.arrived()
        if isinstance(frame, VideoFrame):
            self.width, self.height = frame.width, frame.height
        return frame

    def arrived(self) -> None:
        """A frame came in (counted at the tap when there is one: it may not be decoded)."""
        self.frames += 1
        self._arrivals.append(time.monotonic())

    @property
    def fps(self) -> float:
        """Frames per second over the last few seconds (0 once frames stop for 2 s)."""
        a = self._arrivals
        if len(a) < 2 or time.monotonic() - a[-1] > 2.0:
            return 0.0
        return (len(a) - 1) / (a[-1] - a[0]) if a[-1] > a[0] else 0.0

    def stop(self) -> None:
        super().stop()
        self._source.stop()


class ForwardedTrack(MediaStreamTrack):
    """What one peer receives from another peer, surviving the other peer leaving and returning.

    The source can be switched (a patient reconnects, a different clinician speaks) without
    renegotiating: frames are re-timestamped on this track's own clock so the receiver sees one
    continuous stream. While there is no source, or video is off (audio-only mode), recv waits.

    Video goes one of two ways. Passthrough (`passthrough` set, the source has a tap, full
    mode or the very mode the source was asked to send, the same codec both sides): the
    source's encoded frames, packetized again by this
    peer's sender, no decode or encode. Otherwise decoded pictures from the relay (latest
    only), scaled down in reduced mode, encoded by the sender; the first picture after
    passthrough is made a keyframe, since the viewer's decoder last saw the source's stream.
    """

    def __init__(
        self,
        kind: str,
        relay: MediaRelay,
        on_forward: Callable[[int], None] | None = None,
        on_skip: Callable[[str, int], None] | None = None,
        passthrough: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._relay = relay
        self._source: CountingTrack | None = None
        self._proxy: MediaStreamTrack | None = None
        self._proxy_source: CountingTrack | None = None
        self._feed: EncodedFeed | None = None
        self._changed = asyncio.Event()
        self._last_count = 0
        self.mode = CallMode.FULL
        # What the source is asked to send (CallState.send_mode): when it already sends at
        # this track's mode, its encoded frames pass through as they are.
        self.source_mode = CallMode.FULL
        # Largest picture seen from this source: reduced mode is half of it, whatever arrives.
        self._full_size = (0, 0)
        self._last_sent = 0.0
        self._t0: float | None = None
        self._samples = 0
        self._on_forward = on_forward
        self._on_skip = on_skip
        self.forwarded = 0
        self.skipped = 0
        self.passthrough = passthrough
        # Forwarded audio keeps the source's timestamps, shifted to continue this track's clock.
        self._ts_offset: int | None = None
        # The codec this peer's sender negotiated ("VP8", "H264"); "" until answered.
        self.out_codec = ""
        self._codec_mismatch = False
        self._key_next = False
        self.passed_through = 0

    @property
    def source(self) -> CountingTrack | None:
        return self._source

    def set_source(self, source: CountingTrack | None) -> None:
        if source is self._source:
            return
        self._source = source
        self._codec_mismatch = False
        self._full_size = (0, 0)
        self._release()
        self._last_count = source.frames if source else 0
        self._changed.set()

    def set_mode(self, mode: CallMode, source_mode: CallMode = CallMode.FULL) -> None:
        """Forward at `mode`; the source has been asked to send at `source_mode` (<= mode)."""
        if mode is not self.mode or source_mode is not self.source_mode:
            self.mode = mode
            self.source_mode = source_mode
            self._changed.set()

    def request_keyframe(self) -> None:
        """The viewer lost a picture: in passthrough, only the source can make a keyframe."""
        src = self._source
        if self._feed is not None and src is not None and src.tap is not None:
            src.tap.request_keyframe()

    def _video_on(self) -> bool:
        return self.kind == "audio" or self.mode is not CallMode.AUDIO_ONLY

    def _passing_through(self) -> bool:
        src = self._source
        if not self.passthrough or src is None or src.tap is None or self._codec_mismatch:
            return False
        # Reduced is forwarded as it comes when the source itself was asked to send reduced
        # (a busy edge, a poor patient uplink): no decode and re-encode. Only a viewer whose own
        # link needs less than the source sends is decoded and scaled for.
        if self.kind == "video" and self.mode is not CallMode.FULL and self.mode > self.source_mode:
            return False
        codec = src.tap.codec
        return not codec or not self.out_codec or codec == self.out_codec

    def _release(self) -> None:
        """Let go of the relay proxy and the encoded feed (a change of source, mode or path)."""
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
            if self._proxy_source is not None:
                self._proxy_source.want_decoded(-1)
                self._proxy_source = None
        if self._feed is not None:
            self._feed.close()
            self._feed = None
        self._ts_offset = None

    async def recv(self) -> Frame | Packet[Any]:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            src = self._source
            if src is None or not self._video_on():
                self._release()
                self._changed.clear()
                await self._changed.wait()
                continue
            out: Frame | Packet[Any] | None
            if self._passing_through():
                out = await self._next_encoded(src)
            else:
                out = await self._next_decoded(src)
            if out is not None:
                return out

    async def _wait(self, getter: asyncio.Future[Any]) -> bool:
        """Wait for getter or a change; False (getter cancelled) when something changed."""
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            done, _ = await asyncio.wait({getter, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if getter not in done:
            getter.cancel()
            self._changed.clear()
            self._release()
            return False
        return True

    async def _next_encoded(self, src: CountingTrack) -> Packet[Any] | None:
        assert src.tap is not None
        if self._proxy is not None:
            self._release()
        if self._feed is None:
            self._feed = src.tap.subscribe()
        feed = self._feed
        getter = asyncio.ensure_future(feed.get())
        if not await self._wait(getter):
            return None
        enc = getter.result()
        if self.out_codec and enc.codec != self.out_codec:
            # The viewer negotiated another codec than the source sends: decode and re-encode.
            log.info("passthrough off: source sends %s, viewer takes %s", enc.codec, self.out_codec)
            self._codec_mismatch = True
            self._release()
            return None
        pkt = Packet(enc.data)
        if self.kind == "audio":
            # Opus at 48 kHz, 20 ms a packet: the source's own spacing, continued across sources.
            if self._ts_offset is None:
                self._ts_offset = self._samples - enc.timestamp
            pkt.pts = enc.timestamp + self._ts_offset
            pkt.time_base = AUDIO_CLOCK
            self._samples = pkt.pts + 960
            return pkt
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        pkt.pts = int((now - self._t0) * 90_000)
        pkt.time_base = VIDEO_CLOCK
        self._last_sent = now
        self._key_next = True  # should the decode path take over, it starts with a keyframe
        self.forwarded += 1
        self.passed_through += 1
        if self._on_forward is not None:
            self._on_forward(1)
        return pkt

    async def _next_decoded(self, src: CountingTrack) -> Frame | None:
        if self._feed is not None:
            self._release()
        if self._proxy is None:
            self._proxy = self._relay.subscribe(src, buffered=False)
            self._proxy_source = src
            src.want_decoded(+1)
            self._last_count = src.frames
        proxy = self._proxy
        getter = asyncio.ensure_future(proxy.recv())
        if not await self._wait(getter):
            return None
        try:
            frame = getter.result()
        except MediaStreamError:
            # The sending peer left; wait for another one instead of ending this call.
            if proxy is self._proxy:
                self.set_source(None)
            return None
        out = self._shape(frame)
        if isinstance(out, VideoFrame) and self._key_next:
            out.pict_type = PictureType.I  # our own copy (see _shape), never the relayed frame
            self._key_next = False
        return out

    def _shape(self, frame: Frame | Packet[Any]) -> Frame | None:
        src = self._source
        if src is not None:
            missed = src.frames - self._last_count - 1
            self._last_count = src.frames
            if missed > 0 and self._on_skip is not None:
                self.skipped += missed
                self._on_skip("behind", missed)
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        # The relay hands this very frame object to every other reader too, and our sender's
        # encoder reads it in an executor thread: work on a copy of our own (media/frames.py).
        if isinstance(frame, AudioFrame):
            frame = own_audio_frame(frame)
            # Sample-counting clock: continuous across sources, as the Opus encoder expects.
            frame.pts = self._samples
            frame.time_base = fractions.Fraction(1, frame.sample_rate)
            self._samples += frame.samples
            return frame
        if not isinstance(frame, VideoFrame):
            return None
        if self.mode is CallMode.REDUCED:
            if now - self._last_sent < 1.0 / REDUCED_MAX_FPS * 0.9:
                self.skipped += 1
                if self._on_skip is not None:
                    self._on_skip("mode", 1)
                return None
            fw, fh = self._full_size
            self._full_size = (max(fw, frame.width), max(fh, frame.height))
            w = max(2, self._full_size[0] // REDUCED_SCALE // 2 * 2)
            # A source asked to send reduced has scaled already (it is not scaled again).
            if frame.width > w and self.source_mode is CallMode.FULL:
                h = max(2, round(frame.height * w / frame.width) // 2 * 2)
                scaled = frame.reformat(width=w, height=h)  # a new frame, made on the loop
                frame = scaled if scaled is not frame else own_video_frame(frame)
            else:  # the source already sends reduced: no need to scale again
                frame = own_video_frame(frame)
        else:
            fw, fh = self._full_size
            self._full_size = (max(fw, frame.width), max(fh, frame.height))
            frame = own_video_frame(frame)
        self._last_sent = now
        frame.pts = int((now - self._t0) * 90_000)
        frame.time_base = VIDEO_CLOCK
        self.forwarded += 1
        if self._on_forward is not None:
            self._on_forward(1)
        return frame

    def stop(self) -> None:
        super().stop()
        self._release()
        self._changed.set()
