"""A sampled copy of the patient's video to vision, in a worker thread off the relay path.

The copy is taken on the event loop (media/frames.py): the relayed frame itself is shared by
every reader and must never be converted in another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from edge_nodes.media.consultation import Consultation
from edge_nodes.media.frames import VisionSample
from edge_nodes.vision.analyzer import FrameAnalyzer, VisionResult
from edge_nodes.vitals.pipeline import Event
from telehealth.v1 import media_pb2, vitals_pb2

log = logging.getLogger(__name__)

# Hints repeat this often even when unchanged, so a page that reconnects is soon current.
HINT_REFRESH_S = 2.0
# Niceness of the vision thread: below the event loop, which relays the frames.
VISION_NICE = 15


class VisionWorker:
    """One thread for every call on this edge: vision never competes with the event loop, and
    on a busy edge calls simply get fewer samples (each call waits for its previous result)."""

    def __init__(self, sample_hz: float) -> None:
        self.sample_hz = sample_hz
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="vision", initializer=_background_priority
        )

    async def run(self, call: Consultation) -> None:
        """Sample the patient's video of `call` until cancelled; publish hints and rPPG pulse."""
        analyzer: FrameAnalyzer | None = None
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        last_hint: tuple[int, float] = (0, 0.0)
        pulse_at = 0.0
        while True:
            source = call.patient_video
            if source is None:
                await asyncio.sleep(0.2)
                continue
            proxy = call.relay.subscribe(source, buffered=False)
            source.want_decoded(+1)
            try:
                while call.patient_video is source:
                    frame = await proxy.recv()
                    arrived = time.monotonic()
                    if not isinstance(frame, VideoFrame):
                        continue
                    if analyzer is None:
                        analyzer = await loop.run_in_executor(
                            self._pool, FrameAnalyzer, self.sample_hz
                        )
                    # Copied here, on the loop: the worker never sees the relayed frame.
                    sample = VisionSample.take(frame)
                    result = await loop.run_in_executor(
                        self._pool, _analyse, analyzer, sample, arrived - t0
                    )
                    done = time.monotonic()
                    call.metrics.vision_latency.observe(done - arrived)
                    if result.kind != last_hint[0] or done - last_hint[1] >= HINT_REFRESH_S:
                        last_hint = (int(result.kind), done)
                        call.publish_hint(hint_pb(result))
                    if result.pulse_bpm is not None and done - pulse_at >= 1.0:
                        pulse_at = done
                        publish_pulse(call, result.pulse_bpm)
                    # Sample, do not analyse everything: wait out the rest of the period.
                    await asyncio.sleep(max(0.0, 1.0 / self.sample_hz - (done - arrived)))
            except MediaStreamError:
                await asyncio.sleep(0.2)
            finally:
                proxy.stop()
                source.want_decoded(-1)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _background_priority() -> None:
    """Nice the vision thread (Linux niceness is per thread): face detection is a ~120 ms burst
    of CPU once a second, and on an edge with one core it would otherwise take turns with the
    event loop and hold up every frame being relayed meanwhile (p95 latency). Vision gets
    whatever CPU the relay leaves; it only samples anyway."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), VISION_NICE)


def _analyse(analyzer: FrameAnalyzer, sample: VisionSample, t_s: float) -> VisionResult:
    """In the vision thread: only the sample's private array is touched here."""
    return analyzer.analyse(sample.bgr(), t_s)


def hint_pb(r: VisionResult) -> media_pb2.VisionHint:
    return media_pb2.VisionHint(
        kind=int(r.kind),  # type: ignore[arg-type]
        message=r.message,
        brightness=r.brightness,
        sharpness=r.sharpness,
        face_in_view=r.face_in_view,
        rppg_heart_rate_bpm=r.pulse_bpm or 0.0,
        computed_unix_ns=time.time_ns(),
    )


def publish_pulse(call: Consultation, bpm: float) -> None:
    """The video pulse on the session's vitals stream, beside the device's own heart rate."""
    ch = call.channel
    if ch.released is not None:
        return
    device = ch.latest.heart_rate_bpm
    now = time.time_ns()
    ch.fanout.publish(
        Event(
            session_id=call.session_id,
            edge_received_unix_ns=now,
            derived_heart_rate=vitals_pb2.DerivedHeartRate(
                seq=ch.watermark.value,
                device_heart_rate_bpm=device.value if device is not None else 0.0,
                rppg_heart_rate_bpm=bpm,
                computed_unix_ns=now,
            ),
        )
    )
