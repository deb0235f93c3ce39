"""Video for programs: camera, file or synthetic-face tracks, and a WebRTC call to the edge.

The device agent publishes with it (--video), the clinician side of tests and the video bench
watch with it. Signalling is MediaService.Negotiate on the edge's gRPC address.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import grpc
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from av import VideoFrame
from av.frame import Frame
from av.packet import Packet

from edge_nodes.media.quality import REDUCED_MAX_FPS, REDUCED_SCALE
from edge_nodes.vision.synthetic import SyntheticFace, read_frame_counter
from telehealth.rpc import bearer, secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.v1 import media_pb2, media_pb2_grpc, sessions_pb2

log = logging.getLogger(__name__)
VIDEO_CLOCK = fractions.Fraction(1, 90_000)
PUBLISHER = sessions_pb2.ROLE_PUBLISHER
VIEWER = sessions_pb2.ROLE_VIEWER


class PacedVideoTrack(MediaStreamTrack):
    """Frames from a function of the frame index, paced in real time at fps."""

    kind = "video"

    def __init__(self, make: Callable[[int], Any], fps: float = 30.0) -> None:
        super().__init__()
        self._make = make
        self.fps = fps
        self._start: float | None = None
        self.index = 0
        # When each frame index was handed to the encoder: the latency bench reads it back.
        self.sent_at: dict[int, float] = {}

    async def recv(self) -> Frame | Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self.index / self.fps
        if now - due > 2 / self.fps:
            # Not read for a while (audio-only mode, a busy machine): go on from now rather
            # than sending the missed frames back to back.
            self._start = now - self.index / self.fps
            due = now
        if due > now:
            await asyncio.sleep(due - now)
        i = self.index
        self.index += 1
        img = await asyncio.get_running_loop().run_in_executor(None, self._make, i)
        frame = VideoFrame.from_ndarray(img, format="bgr24")
        frame.pts = round(i * 90_000 / self.fps)
        frame.time_base = VIDEO_CLOCK
        self.sent_at[i] = time.monotonic()
        if len(self.sent_at) > 4096:
            self.sent_at.pop(next(iter(self.sent_at)))
        return frame


def synthetic_track(
    pulse_bpm: float = 72.0,
    width: int = 640,
    height: int = 480,
    fps: float = 30.0,
    label_frames: bool = False,
) -> PacedVideoTrack:
    """A synthetic patient face whose skin pulses at pulse_bpm (what --video synthetic sends)."""
    clip = SyntheticFace(
        pulse_bpm=pulse_bpm, width=width, height=height, fps=fps, label_frames=label_frames
    )
    return PacedVideoTrack(clip.frame, fps)


class CameraTrack(PacedVideoTrack):
    """A local camera through OpenCV (index like 0, or a device path)."""

    def __init__(self, device: int | str = 0, fps: float = 30.0) -> None:
        self._cap = cv2.VideoCapture(device)
        if not self._cap.isOpened():
            raise RuntimeError(f"cannot open camera {device!r}")
        super().__init__(self._read, fps)

    def _read(self, _: int) -> Any:
        ok, img = self._cap.read()
        if not ok:
            raise MediaStreamError
        return img

    def stop(self) -> None:
        super().stop()
        self._cap.release()


class AdaptiveVideoTrack(MediaStreamTrack):
    """What the device sends, following the edge's CallState.send_mode: everything at FULL;
    half the width and height at no more than 15 fps at REDUCED; no video at AUDIO_ONLY
    (the source is still read, so a camera or file does not back up, and its frames dropped).
    The edge then forwards what arrives as it is, instead of re-encoding it smaller."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source
        self.mode: int = media_pb2.CALL_MODE_FULL
        self._last_sent = 0.0
        self.sent = 0

    def set_mode(self, mode: int) -> None:
        if mode in (
            media_pb2.CALL_MODE_FULL,
            media_pb2.CALL_MODE_REDUCED,
            media_pb2.CALL_MODE_AUDIO_ONLY,
        ):
            self.mode = mode

    async def recv(self) -> Frame | Packet[Any]:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame = await self.source.recv()
            if self.mode == media_pb2.CALL_MODE_AUDIO_ONLY:
                continue
            if not isinstance(frame, VideoFrame):
                return frame  # pre-encoded (a packet loop): sent as it is, it cannot be scaled
            if self.mode == media_pb2.CALL_MODE_REDUCED:
                now = time.monotonic()
                if now - self._last_sent < 1.0 / REDUCED_MAX_FPS * 0.9:
                    continue
                self._last_sent = now
                w = max(2, frame.width // REDUCED_SCALE // 2 * 2)
                h = max(2, frame.height // REDUCED_SCALE // 2 * 2)
                scaled = frame.reformat(width=w, height=h)
                scaled.pts, scaled.time_base = frame.pts, frame.time_base
                frame = scaled
            self.sent += 1
            return frame

    def stop(self) -> None:
        super().stop()
        self.source.stop()


def video_source(spec: str) -> tuple[MediaStreamTrack | None, MediaStreamTrack | None]:
    """(video, audio) for --video camera[:N] | file:PATH | synthetic[:BPM]."""
    kind, _, arg = spec.partition(":")
    if kind == "camera":
        return CameraTrack(int(arg) if arg.isdigit() else (arg or 0)), AudioStreamTrack()
    if kind == "file":
        player = MediaPlayer(arg, loop=True)
        return player.video, player.audio or AudioStreamTrack()
    if kind == "synthetic":
        return synthetic_track(float(arg or 72.0)), AudioStreamTrack()
    raise ValueError(f"--video must be camera[:N], file:PATH or synthetic[:BPM], not {spec!r}")


@dataclass
class Received:
    """What a call received of one video track."""

    frames: int = 0
    width: int = 0
    height: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    # (frame counter read from the pixels, monotonic arrival time)
    counters: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fps(self) -> float:
        span = self.last_at - self.first_at
        return (self.frames - 1) / span if self.frames > 1 and span > 0 else 0.0


class MediaCall:
    """One program's call to its edge: send tracks, receive the other side's, hang up."""

    def __init__(
        self,
        edge_address: str,
        session_id: str,
        token: str,
        role: int,
        video: MediaStreamTrack | None = None,
        audio: MediaStreamTrack | None = None,
        read_counters: bool = False,
        tls: TlsFiles | None = None,
        server_name: str = "",
        adapt: bool = True,
        follow_state: bool = False,
        token_source: Callable[[], str] | None = None,
        relay_only: bool = False,
    ) -> None:
        """relay_only: media only through the TURN relay the edge names (a device on a
        network that lets nothing else out; also how a TURN setup is checked)."""
        self.edge_address = edge_address
        self.session_id = session_id
        self._token = token
        self.role = role
        self._tls = tls
        self._server_name = server_name
        # Watch the call's state (a patient with adaptive video always does).
        self._follow_state = follow_state
        # Where a renewed token comes from (the device agent's), for long calls.
        self._token_source = token_source
        self._relay_only = relay_only
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.add_listener("track", self._on_track)
        # A patient's video follows the edge's send_mode (watched over WatchCall).
        if video is not None and role == PUBLISHER and adapt:
            video = AdaptiveVideoTrack(video)
        self.video = video
        self.audio = audio
        # The call as the edge last described it (WatchCall), once started.
        self.state: media_pb2.CallState | None = None
        self.received = Received()
        self.audio_frames = 0
        self.call_id = ""
        self.answer_sdp = ""
        self._read_counters = read_counters
        self._tasks: list[asyncio.Task[None]] = []
        self._closing_pcs: list[RTCPeerConnection] = []
        self._channel: grpc.aio.Channel | None = None

    def _new_peer_connection(self, servers: list[RTCIceServer]) -> None:
        """Rebuild the (still unused) peer connection with the edge's ICE servers."""
        old = self.pc
        self.pc = RTCPeerConnection(
            RTCConfiguration(
                iceServers=servers,
                iceTransportPolicy=RTCIceTransportPolicy.RELAY
                if self._relay_only
                else RTCIceTransportPolicy.ALL,
            )
        )
        self.pc.add_listener("track", self._on_track)
        self._closing_pcs.append(old)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        r = self.received
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
                # Like a browser, show the newest frame: a slow reader must not add delay.
                queue = getattr(track, "_queue", None)
                while isinstance(queue, asyncio.Queue) and queue.qsize() > 0:
                    newer = queue.get_nowait()
                    if newer is None:
                        raise MediaStreamError
                    frame = newer
            except MediaStreamError:
                return
            if isinstance(frame, VideoFrame):
                now = time.monotonic()
                r.frames += 1
                r.width, r.height = frame.width, frame.height
                r.first_at = r.first_at or now
                r.last_at = now
                if self._read_counters:
                    img = await loop.run_in_executor(None, _gray, frame)
                    r.counters.append((read_frame_counter(img), now))
            else:
                self.audio_frames += 1

    async def offer(self) -> str:
        """Add tracks (or receive-only transceivers) and return the complete local offer."""
        pc = self.pc
        for kind, track in (("audio", self.audio), ("video", self.video)):
            if track is not None:
                pc.addTrack(track)
            else:
                pc.addTransceiver(kind, direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp

    async def start(self, timeout: float = 10.0) -> media_pb2.NegotiateMediaResponse:
        # The device's own TLS settings; an edge dialled by IP is checked against the name the
        # assignment gives for it.
        self._channel = secure_channel(self.edge_address, self._tls, server_name=self._server_name)
        stub = media_pb2_grpc.MediaServiceStub(self._channel)
        # STUN/TURN servers (TURN with short-lived credentials) from the edge, before the
        # offer gathers its candidates; none when the edge's UDP range is reachable directly.
        ice = await stub.GetIceServers(
            media_pb2.GetIceServersRequest(session_id=self.session_id),
            metadata=bearer(self._token),
            timeout=timeout,
        )
        if ice.ice_servers or self._relay_only:
            self._new_peer_connection(
                [
                    RTCIceServer(
                        urls=list(s.urls),
                        username=s.username or None,
                        credential=s.credential or None,
                    )
                    for s in ice.ice_servers
                ]
            )
        offer = await self.offer()
        resp: media_pb2.NegotiateMediaResponse = await stub.Negotiate(
            media_pb2.NegotiateMediaRequest(
                session_id=self.session_id,
                role=self.role,  # type: ignore[arg-type]
                offer_sdp=offer,
            ),
            metadata=bearer(self._token),
            timeout=timeout,
        )
        self.call_id = resp.call_id
        self.answer_sdp = resp.answer_sdp
        await self.pc.setRemoteDescription(RTCSessionDescription(resp.answer_sdp, "answer"))
        if isinstance(self.video, AdaptiveVideoTrack) or self._follow_state:
            self._tasks.append(asyncio.ensure_future(self._watch(stub)))
        return resp

    async def _watch(self, stub: media_pb2_grpc.MediaServiceAsyncStub) -> None:
        """Follow the call's state; a patient's video adapts to what the edge asks it to send.
        The edge ends the watch when its token expires: with a token_source (the device
        agent's renewed token) it is watched again with the fresh one."""
        while True:
            token = self._token_source() if self._token_source is not None else self._token
            try:
                await self._follow(stub, token)
                return
            except grpc.aio.AioRpcError as e:
                expired = e.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in (
                    e.details() or ""
                )
                if not expired or self._token_source is None or self._token_source() == token:
                    # The call ended or the edge went away: the call's own connection state
                    # tells the owner; the video just stops adapting.
                    log.debug("watch ended", extra={"code": e.code().name})
                    return

    async def _follow(self, stub: media_pb2_grpc.MediaServiceAsyncStub, token: str) -> None:
        stream = stub.WatchCall(
            media_pb2.WatchCallRequest(session_id=self.session_id), metadata=bearer(token)
        )
        async for ev in stream:
            if not ev.HasField("state"):
                continue
            self.state = ev.state
            if isinstance(self.video, AdaptiveVideoTrack):
                mode = ev.state.send_mode or media_pb2.CALL_MODE_FULL
                if mode != self.video.mode:
                    log.info(
                        "video send mode",
                        extra={
                            "session": self.session_id,
                            "mode": media_pb2.CallMode.Name(mode),
                        },
                    )
                self.video.set_mode(mode)

    async def hangup(self) -> None:
        if self._channel is not None and self.call_id:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await media_pb2_grpc.MediaServiceStub(self._channel).Hangup(
                    media_pb2.HangupMediaRequest(session_id=self.session_id, call_id=self.call_id),
                    metadata=bearer(self._token),
                    timeout=5.0,
                )
        await self.close()

    async def close(self) -> None:
        """Close without telling the edge (a device that vanishes)."""
        await self.pc.close()
        for pc in self._closing_pcs:
            await pc.close()
        self._closing_pcs.clear()
        if self.video is not None:
            self.video.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _gray(frame: VideoFrame) -> Any:
    return np.asarray(frame.to_ndarray(format="gray"))


def _freshest_token(agent: Any, assigned: str) -> str:
    """The device agent renews its publisher token in place; until then, the assignment's."""
    return str(agent.token or assigned)


async def publish_video(agent: Any, spec: str, stop: asyncio.Event) -> None:
    """Keep the device agent's camera (or file, or synthetic face) in a call with its edge.

    Follows the agent's assignment: when the session moves to another edge, the call is made
    again there with the new token.
    """
    await agent.opened.wait()
    while not stop.is_set():
        a = agent.assignment
        video, audio = video_source(spec)
        call = MediaCall(
            a.edge_address,
            agent.session_id,
            agent.token or a.token,  # the freshest publisher token of the session
            PUBLISHER,
            video,
            audio,
            tls=agent.cfg.tls,
            server_name=a.edge_tls_server_name,
            token_source=functools.partial(_freshest_token, agent, a.token),
        )
        try:
            await call.start()
            log.info(
                "video call started", extra={"session": agent.session_id, "call": call.call_id}
            )
            while (
                not stop.is_set() and agent.assignment is a and call.pc.connectionState != "failed"
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        except grpc.aio.AioRpcError as e:
            log.warning("video call refused", extra={"code": e.code().name, "detail": e.details()})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
        finally:
            await call.hangup()
            if video is not None:
                video.stop()


async def run_with_video(
    agents: list[Any], spec: str, stop: asyncio.Event, duration_s: float
) -> None:
    """Run device agents (vitals) with a video call each, until stop or duration."""
    if duration_s > 0:
        asyncio.get_running_loop().call_later(duration_s, stop.set)
    videos = [asyncio.create_task(publish_video(a, spec, stop)) for a in agents]
    try:
        await asyncio.gather(*(a.run(stop, duration_s) for a in agents))
    finally:
        stop.set()
        await asyncio.gather(*videos, return_exceptions=True)
