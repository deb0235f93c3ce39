"""The peers of the video bench, as their own process: patients sending and clinicians receiving.

`python -m loadtest.video_peers SPEC.json OUT.json` pins itself to the CPUs the spec names,
runs the plan (a direct two-way aiortc call, or calls through an edge) and writes its figures.
The edge (the system under test) is another process on another CPU; its CPU time is read here
from its pid over the same windows as the frames.

Latency is glass-to-glass: the time a frame is handed to the sender's encoder (or, for the
pre-encoded senders of the capacity ramp, to its packetizer) to the time the receiver has it
decoded, matched by a counter drawn into the pixels and read back. Sender and receiver are in
this process, so there is one clock.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from av import VideoFrame
from av.frame import Frame
from av.packet import Packet

from clients.video import PUBLISHER, VIEWER, MediaCall, PacedVideoTrack, synthetic_track
from edge_nodes.vision.synthetic import SyntheticFace, read_frame_counter

VIDEO_CLOCK = fractions.Fraction(1, 90_000)
WIDTH, HEIGHT, FPS = 640, 480, 30.0
# Pre-encoded loop of the capacity ramp: 5 s of labelled frames, a keyframe every second (so a
# viewer joining mid-stream, who cannot ask a packet loop for one, waits at most a second).
LOOP_FRAMES = 150
LOOP_GOP = 30
LOOP_BITRATE = 1_000_000


# -- senders ------------------------------------------------------------------------------


def encode_loop(pulse_bpm: float = 72.0, frames: int = LOOP_FRAMES) -> list[bytes]:
    """VP8 frames of the labelled synthetic face, encoded once with aiortc's realtime options."""
    clip = SyntheticFace(
        pulse_bpm=pulse_bpm, width=WIDTH, height=HEIGHT, fps=FPS, label_frames=True
    )
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = WIDTH, HEIGHT
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = LOOP_BITRATE
    codec.gop_size = LOOP_GOP
    codec.time_base = fractions.Fraction(1, int(FPS))
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "-6",
        "lag-in-frames": "0",
        "minrate": str(LOOP_BITRATE),
        "maxrate": str(LOOP_BITRATE),
        "bufsize": str(LOOP_BITRATE),
    }
    out: list[bytes] = []
    for i in range(frames):
        vf = VideoFrame.from_ndarray(clip.frame(i), format="bgr24").reformat(format="yuv420p")
        vf.pts = i
        if i % LOOP_GOP == 0:
            vf.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in codec.encode(vf))
        out.append(data)
    return out


class LoopTrack(MediaStreamTrack):
    """Pre-encoded VP8 frames, paced at fps: the sender only packetizes (a cheap load generator
    for the capacity ramp, so the peers' CPU is not what limits the edge)."""

    kind = "video"

    def __init__(self, frames: list[bytes], fps: float = FPS) -> None:
        super().__init__()
        self._frames = frames
        self.fps = fps
        self._start: float | None = None
        self.index = 0
        self.sent_at: dict[int, float] = {}

    async def recv(self) -> Frame | Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self.index / self.fps
        if due > now:
            await asyncio.sleep(due - now)
        i = self.index % len(self._frames)
        pkt = av.Packet(self._frames[i])
        pkt.pts = round(self.index * 90_000 / self.fps)
        pkt.time_base = VIDEO_CLOCK
        self.index += 1
        self.sent_at[i] = time.monotonic()
        return pkt


# -- receivers ----------------------------------------------------------------------------


@dataclass
class Probe:
    """Frames received on one video track: arrival time and glass-to-glass latency (ms)."""

    sent_at: dict[int, float]
    arrivals: list[float] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)

    async def consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
                # Like a browser, show the newest frame: a slow reader must not add delay.
                queue = getattr(track, "_queue", None)
                while isinstance(queue, asyncio.Queue) and queue.qsize() > 0:
                    newer = queue.get_nowait()
                    if newer is None:
                        return
                    frame = newer
            except MediaStreamError:
                return
            if not isinstance(frame, VideoFrame):
                continue
            now = time.monotonic()
            self.arrivals.append(now)
            # The Y plane is the grey image: the counter's squares are read from its top rows.
            y = np.asarray(frame.to_ndarray(format="gray"))
            t0 = self.sent_at.get(read_frame_counter(y))
            # Counters are matched online: a packet loop sends the same counter again later.
            if t0 is not None and 0 <= now - t0 < 5.0:
                self.latencies.append((now, (now - t0) * 1000))

    def frames(self) -> int:
        return len(self.arrivals)

    def fps(self, t0: float, t1: float) -> float:
        ts = [a for a in self.arrivals if t0 <= a < t1]
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0

    def window(self, t0: float, t1: float) -> list[float]:
        return [ms for at, ms in self.latencies if t0 <= at < t1]


class ProbeCall(MediaCall):
    """A MediaCall whose received video goes to a Probe."""

    def __init__(self, *args: Any, probe: Probe | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.probe = probe

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self.probe is not None:
            self._tasks.append(asyncio.ensure_future(self.probe.consume(track)))
        else:
            super()._on_track(track)


# -- figures ------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {
        "n": len(v),
        "p50": round(statistics.median(v), 1),
        "p95": round(v[int(0.95 * (len(v) - 1))], 1),
        "mean": round(statistics.fmean(v), 1),
    }


class CpuMeter:
    """CPU time of this process and of the system under test's processes over a window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {"peers": psutil.Process()}
        for name, pid in pids.items():
            try:
                self._procs[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
        self._t0 = 0.0
        self._c0: dict[str, float] = {}

    def _cpu(self) -> dict[str, float]:
        out = {}
        for name, p in self._procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.NoSuchProcess:
                out[name] = 0.0
        return out

    def start(self) -> None:
        self._t0, self._c0 = time.monotonic(), self._cpu()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        c1 = self._cpu()
        return {k: round(100 * (c1[k] - self._c0.get(k, 0.0)) / wall, 1) for k in c1}


async def until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no video within {timeout:.0f} s")
        await asyncio.sleep(0.05)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- plans --------------------------------------------------------------------------------


async def direct(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline: the same two-way call with the patient's and clinician's peers connected to each
    other, no edge in between; figures of the patient -> clinician direction (encoded live; the
    video sent back is a pre-encoded loop, as through the edge)."""
    patient_video = synthetic_track(width=WIDTH, height=HEIGHT, fps=FPS, label_frames=True)
    back = LoopTrack(encode_loop(60.0))
    a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    probe = Probe(patient_video.sent_at)
    clinician = ProbeCall("direct", "direct", "", VIEWER, back, AudioStreamTrack(), probe=probe)
    b = clinician.pc
    a.addTrack(AudioStreamTrack())
    a.addTrack(patient_video)
    a.add_listener("track", lambda t: clinician._tasks.append(asyncio.ensure_future(_drain(t))))
    b.addTrack(clinician.audio)  # type: ignore[arg-type]
    b.addTrack(back)
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(RTCSessionDescription(a.localDescription.sdp, "offer"))
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(RTCSessionDescription(b.localDescription.sdp, "answer"))
    try:
        await until(lambda: probe.frames() > 30, 20, "direct call")
        await asyncio.sleep(spec["warmup_s"])
        cpu = CpuMeter({})
        cpu.start()
        t0 = time.monotonic()
        await asyncio.sleep(spec["seconds"])
        t1 = time.monotonic()
        used = cpu.stop()
        lat = probe.window(t0, t1)
        return {
            "latency_ms": summary(lat),
            # Raw, so runs before and after the edge's can be pooled (then dropped).
            "samples_ms": [round(x, 1) for x in lat],
            "fps": round(probe.fps(t0, t1), 1),
            "peers_cpu_percent": used["peers"],
            "seconds": spec["seconds"],
            "loadavg": loadavg(),
        }
    finally:
        await a.close()
        await clinician.close()


async def _drain(track: MediaStreamTrack) -> None:
    """Read (and so decode) what the patient receives, as a patient's page would show it."""
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return


@dataclass
class EdgeCall:
    patient: MediaCall
    clinician: ProbeCall
    probe: Probe

    async def hangup(self) -> None:
        await self.patient.hangup()
        await self.clinician.hangup()
        for t in (self.patient.video, self.clinician.video):
            if t is not None:
                t.stop()


async def edge_call(
    address: str, s: dict[str, str], video: MediaStreamTrack, back: MediaStreamTrack
) -> EdgeCall:
    sent_at: dict[int, float] = video.sent_at  # type: ignore[attr-defined]
    probe = Probe(sent_at)
    # adapt=False: the bench measures the edge relaying 640x480@30; a loaded bench machine's
    # round trips must not make the patient send less (the edge's own link rules still run).
    patient = MediaCall(
        address,
        s["session_id"],
        s["publisher_token"],
        PUBLISHER,
        video,
        AudioStreamTrack(),
        adapt=False,
    )
    clinician = ProbeCall(
        address, s["session_id"], s["viewer_token"], VIEWER, back, AudioStreamTrack(), probe=probe
    )
    await patient.start()
    await clinician.start()
    return EdgeCall(patient, clinician, probe)


async def through_edge(spec: dict[str, Any]) -> dict[str, Any]:
    """One live-encoded call (latency, early vs late), then the capacity ramp of packet loops."""
    address, sessions, pids = spec["edge_address"], spec["sessions"], spec["pids"]
    out: dict[str, Any] = {}
    # The patient's video is encoded live (glass-to-glass includes the encoder); the video sent
    # back, not measured, is a pre-encoded loop, so the peers' own CPU adds less noise.
    video: PacedVideoTrack = synthetic_track(width=WIDTH, height=HEIGHT, fps=FPS, label_frames=True)
    back = LoopTrack(encode_loop(60.0))
    call = await edge_call(address, sessions[0], video, back)
    try:
        await until(lambda: call.probe.frames() > 30, 30, "call through the edge")
        await asyncio.sleep(spec["warmup_s"])
        w = spec["window_s"]
        cpu, first, last = CpuMeter(pids), CpuMeter(pids), CpuMeter(pids)
        cpu.start()
        first.start()
        t0 = time.monotonic()
        end = t0 + spec["call_s"]
        first_used: dict[str, float] | None = None
        last_started = False
        next_note = t0 + 60.0
        # The edge's CPU over the first and the last window as well as the whole call, and a
        # line a minute on a long call (it prints nothing else for ten minutes).
        while (now := time.monotonic()) < end:
            if first_used is None and now - t0 >= w:
                first_used = first.stop()
            if not last_started and end - now <= w:
                last.start()
                last_started = True
            if now >= next_note:
                print(f"[video] call {now - t0:.0f}/{spec['call_s']:.0f} s", file=sys.stderr)
                next_note += 60.0
            wake = min(
                end,
                next_note,
                t0 + w if first_used is None else end,
                end - w if not last_started else end,
            )
            await asyncio.sleep(max(0.01, wake - now))
        t1 = time.monotonic()
        used = cpu.stop()
        first_used = first_used or first.stop()
        last_used = last.stop() if last_started else used
        out["call"] = {
            "latency_ms": summary(call.probe.window(t0, t1)),
            "fps": round(call.probe.fps(t0, t1), 1),
            "cpu_percent": used,
            "seconds": spec["call_s"],
            "window_s": w,
            "first_window_ms": summary(call.probe.window(t0, t0 + w)),
            "last_window_ms": summary(call.probe.window(t1 - w, t1)),
            "first_window_fps": round(call.probe.fps(t0, t0 + w), 1),
            "last_window_fps": round(call.probe.fps(t1 - w, t1), 1),
            "first_window_cpu_percent": first_used,
            "last_window_cpu_percent": last_used,
            "loadavg": loadavg(),
        }
    finally:
        await call.hangup()
    print(f"[video] one call through the edge: {out['call']['latency_ms']}", file=sys.stderr)
    out["ramp"] = await ramp(spec, address, sessions[1:], pids) if spec["ramp"]["steps"] else []
    return out


async def ramp(
    spec: dict[str, Any], address: str, sessions: list[dict[str, str]], pids: dict[str, int]
) -> list[dict[str, Any]]:
    """Add two-way calls one step at a time until a step fails: a call's delivered fps below
    min_fps, or the step's latency p95 more than latency_bound_ms above the first step's (one
    call): delay building up under load is a failure even at full frame rate."""
    r = spec["ramp"]
    base_p95: float | None = None
    loops = (encode_loop(72.0), encode_loop(60.0))
    calls: list[EdgeCall] = []
    steps: list[dict[str, Any]] = []
    deadline = time.monotonic() + r["budget_s"]
    try:
        for n in r["steps"]:
            if n > len(sessions):
                break
            if time.monotonic() > deadline:
                print(f"[video] ramp stopped before {n} calls: out of time", file=sys.stderr)
                break
            while len(calls) < n:
                s = sessions[len(calls)]
                calls.append(await edge_call(address, s, LoopTrack(loops[0]), LoopTrack(loops[1])))
            try:
                await until(lambda: all(c.probe.frames() > 30 for c in calls), 10, f"{n} calls")
            except TimeoutError:
                steps.append({"calls": n, "fps_min": 0.0, "started": False})
                break
            await asyncio.sleep(r["warmup_s"])
            cpu = CpuMeter(pids)
            cpu.start()
            t0 = time.monotonic()
            await asyncio.sleep(r["step_s"])
            t1 = time.monotonic()
            used = cpu.stop()
            fps = [c.probe.fps(t0, t1) for c in calls]
            lat = [ms for c in calls for ms in c.probe.window(t0, t1)]
            lat_summary = summary(lat)
            p95 = lat_summary.get("p95")
            if base_p95 is None:
                base_p95 = p95
            bound = r.get("latency_bound_ms")
            latency_ok = bound is None or p95 is None or base_p95 is None or p95 <= base_p95 + bound
            step = {
                "calls": n,
                "fps_min": round(min(fps), 1),
                "fps_mean": round(statistics.fmean(fps), 1),
                "latency_ms": lat_summary,
                "latency_ok": latency_ok,
                "cpu_percent": used,
                "loadavg": loadavg(),
            }
            steps.append(step)
            print(f"[video] ramp {step}", file=sys.stderr, flush=True)
            if step["fps_min"] < r["min_fps"] or not latency_ok:
                break
    finally:
        await asyncio.gather(*(c.hangup() for c in calls), return_exceptions=True)
    return steps


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["mode"] == "direct":
        return await direct(spec)
    return await through_edge(spec)


def main() -> None:
    spec_file, out_file = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_file.read_text())
    if spec.get("cpus"):
        # Before any thread exists: aiortc's and PyAV's threads inherit the mask.
        os.sched_setaffinity(0, set(spec["cpus"]))
    result = asyncio.run(run(spec))
    out_file.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
