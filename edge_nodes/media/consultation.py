"""One session's video consultation at the edge: the patient's peer, clinicians' peers, relay."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.contrib.media import MediaRelay

from edge_nodes.media.quality import CallMode, LinkModeController, LinkSample, worst
from edge_nodes.media.tracks import CountingTrack, ForwardedTrack
from edge_nodes.vitals.fanout import Fanout, Subscriber, SubscriberClosed
from edge_nodes.vitals.pipeline import Event, SessionChannel
from telehealth.telemetry.metrics import MediaMetrics
from telehealth.v1 import media_pb2

log = logging.getLogger(__name__)

PATIENT = "publisher"
CLINICIAN = "viewer"
CallEvent = media_pb2.WatchCallResponse


@dataclass
class LinkCounters:
    """Cumulative RTP counts of one stream (kind and SSRC) at the last sample."""

    lost: int = 0
    received: int = 0


@dataclass
class LinkTally:
    """One second of one direction of a peer's link, every stream on it."""

    packets: int = 0
    worst_loss: float = 0.0

    def add(self, counters: dict[str, LinkCounters], key: str, lost: int, received: int) -> None:
        last = counters.get(key)
        counters[key] = LinkCounters(lost, received)
        if last is None:  # first sight of this stream: a baseline, not a second of evidence
            return
        d_lost = max(0, lost - last.lost)
        d_recv = max(0, received - last.received)
        n = d_lost + d_recv
        self.packets += n
        # Loss per stream (audio and video each), worst counts: audio has no retransmissions,
        # so it shows a lossy link even when video NACKs paper over it, and it is still there
        # in audio-only mode when no video flows to measure.
        if n >= STREAM_EVIDENCE_PACKETS:
            self.worst_loss = max(self.worst_loss, d_lost / n)


# Packets of one stream in a second below which its loss fraction is too noisy to use.
STREAM_EVIDENCE_PACKETS = 5


@dataclass
class Peer:
    """One RTCPeerConnection to the edge: a patient's device or one clinician."""

    call_id: str
    role: str
    session_id: str
    pc: RTCPeerConnection
    # Who negotiated this peer (the token's "act": the clinician; "" for a patient's device).
    # Only the same role and subject may hang it up.
    subject_id: str = ""
    started_unix_ns: int = field(default_factory=time.time_ns)
    # What this peer sends to the edge, counted: the sources of other peers' ForwardedTracks.
    incoming: dict[str, CountingTrack] = field(default_factory=dict)
    # What the edge sends to this peer.
    outgoing: dict[str, ForwardedTrack] = field(default_factory=dict)
    link: LinkModeController = field(default_factory=LinkModeController)
    # RTP streams from the peer (inbound-rtp) and to it (remote-inbound-rtp: its RTCP reports).
    uplink: dict[str, LinkCounters] = field(default_factory=dict)
    downlink: dict[str, LinkCounters] = field(default_factory=dict)
    # When RTP from this peer last arrived (monotonic); None before its media starts.
    media_at: float | None = None
    # No RTP from the peer for media_silence_s: its device is gone or its network is down,
    # although ICE has not given up on it yet (that takes ~30 s).
    silent: bool = False
    closed: bool = False

    @property
    def live(self) -> bool:
        return not self.closed and self.pc.connectionState not in ("failed", "closed")

    @property
    def present(self) -> bool:
        """Connected and sending: what the console shows as "patient connected"."""
        return self.live and not self.silent


def new_call_id() -> str:
    return uuid.uuid4().hex


class Consultation:
    """Wires tracks between the peers of one session and reports the call's state.

    The patient's audio and video go to every clinician; the clinician who joined first (the
    'speaking' clinician) is seen and heard by the patient, and the next one takes over when
    they leave. Each consumer has its own ForwardedTrack, so one slow clinician only slows
    their own copy.
    """

    def __init__(
        self,
        session_id: str,
        channel: SessionChannel,
        metrics: MediaMetrics,
        passthrough: bool = False,
    ) -> None:
        self.session_id = session_id
        # Forward encoded video as it came when the codecs match (see media/passthrough.py).
        self.passthrough = passthrough
        self.channel = channel
        self.metrics = metrics
        self.relay = MediaRelay()
        self.patient: Peer | None = None
        self.clinicians: dict[str, Peer] = {}
        self.speaking: str | None = None
        self.events: Fanout[CallEvent] = Fanout()
        self.mode = CallMode.FULL
        # What the patient's device is asked to send (CallState.send_mode).
        self.send_mode = CallMode.FULL
        self.reason = "waiting for the patient"
        self.budget_mode = CallMode.FULL
        self.budget_ok_s = 0
        # Pixels/s the patient sends at full quality, kept while it is asked to send less (what
        # arrives then is smaller, and would make the budget think full quality fits again).
        self.full_pixel_rate = 0.0
        self.news2_band = 0
        self.started_unix_ns = time.time_ns()
        self.ended: str | None = None
        self.last_hint: media_pb2.VisionHint | None = None
        self._last_state_key: tuple[object, ...] = ()
        self._state_sent_at = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        # Token-expiry timers of watchers (by id of their subscriber), cancelled on unwatch.
        self.expiries: dict[int, asyncio.TimerHandle] = {}

    # -- membership ---------------------------------------------------------------------

    @property
    def peers(self) -> list[Peer]:
        return ([self.patient] if self.patient else []) + list(self.clinicians.values())

    def forwarded_track(self, kind: str) -> ForwardedTrack:
        m = self.metrics
        return ForwardedTrack(
            kind,
            self.relay,
            on_forward=m.frames_relayed.inc if kind == "video" else None,
            on_skip=(lambda reason, n: m.dropped(reason).inc(n)) if kind == "video" else None,
            passthrough=self.passthrough,
        )

    def attach(self, peer: Peer) -> None:
        """A negotiated peer joins: connect its tracks both ways."""
        if peer.role == PATIENT:
            self.patient = peer
            for c in self.clinicians.values():
                for kind, fwd in c.outgoing.items():
                    fwd.set_source(peer.incoming.get(kind))
            # A clinician may have joined first (a patient rejoining after a move, say): the
            # patient sees the speaking one from the start.
            if self.speaking is None and self.clinicians:
                self.speaking = next(iter(self.clinicians))
            self._set_speaking(self.speaking)
        else:
            self.clinicians[peer.call_id] = peer
            for kind, fwd in peer.outgoing.items():
                fwd.set_source(self.patient.incoming.get(kind) if self.patient else None)
            if self.speaking is None:
                self._set_speaking(peer.call_id)
        self.publish_state(force=True)

    def detach(self, peer: Peer) -> None:
        if peer.role == PATIENT:
            if self.patient is peer:
                self.patient = None
                for c in self.clinicians.values():
                    for fwd in c.outgoing.values():
                        fwd.set_source(None)
        else:
            self.clinicians.pop(peer.call_id, None)
            if self.speaking == peer.call_id:
                self._set_speaking(next(iter(self.clinicians), None))
        for fwd in peer.outgoing.values():
            fwd.stop()
        self.publish_state(force=True)

    def _set_speaking(self, call_id: str | None) -> None:
        self.speaking = call_id
        if self.patient is None:
            return
        source = self.clinicians.get(call_id) if call_id else None
        for kind, fwd in self.patient.outgoing.items():
            fwd.set_source(source.incoming.get(kind) if source else None)

    def patient_tracks_changed(self) -> None:
        if self.patient is not None:
            self.attach(self.patient)

    # -- vitals: priority and release ---------------------------------------------------

    async def follow_vitals(self) -> str:
        """Track the session's NEWS2 band; return the reason when the session leaves this edge."""
        sub: Subscriber[Event] = Subscriber(64)
        self.channel.subscribe(sub, include_latest=True)
        try:
            while True:
                try:
                    _, events = await sub.take()
                except SubscriberClosed as closed:
                    return closed.reason
                for ev in events:
                    if ev.HasField("news2") and ev.news2.band != self.news2_band:
                        self.news2_band = int(ev.news2.band)
                        self.publish_state(force=True)
        finally:
            self.channel.fanout.remove(sub)

    # -- quality ------------------------------------------------------------------------

    async def sample_links(self, silence_s: float) -> None:
        """Feed one second of RTCP figures of every peer into its link controller, and notice
        a peer whose media stopped (no RTP for silence_s)."""
        for peer in self.peers:
            if not peer.live or peer.pc.connectionState != "connected":
                continue
            try:
                report = await peer.pc.getStats()
            except Exception:  # a peer closing under us: next second will not see it
                continue
            now = time.monotonic()
            up, down = LinkTally(), LinkTally()
            rtts: list[float] = []
            for s in report.values():
                kind = getattr(s, "kind", "")
                if kind not in ("audio", "video"):
                    continue
                key = f"{kind}:{s.ssrc}"
                if s.type == "inbound-rtp":
                    up.add(peer.uplink, key, int(s.packetsLost), int(s.packetsReceived))
                elif s.type == "remote-inbound-rtp":
                    # Stored as each receiver report arrives: unchanged figures (no new report)
                    # add no packets, so a peer that stopped reporting is no evidence of a
                    # good link.
                    down.add(peer.downlink, key, int(s.packetsLost), int(s.packetsReceived))
                    # None until the first RTCP receiver report with a round trip arrives.
                    if s.roundTripTime is not None:
                        rtts.append(float(s.roundTripTime))
            if up.packets > 0 or peer.media_at is None:
                peer.media_at = now
            silent = now - peer.media_at >= silence_s
            if silent != peer.silent:
                peer.silent = silent
                log.info(
                    "peer media " + ("stopped" if silent else "resumed"),
                    extra={"session": peer.session_id, "call": peer.call_id, "role": peer.role},
                )
            peer.link.update(
                LinkSample(
                    max(up.worst_loss, down.worst_loss),
                    max(rtts) if rtts else None,
                    packets=up.packets + down.packets,
                )
            )

    def apply_modes(self) -> None:
        """Choose what the patient sends and what each viewer gets.

        The patient is asked to send the worst of its own link, the edge's budget and the best
        clinician's link (sending more than the best viewer can take helps nobody). Each viewer
        gets that, or less when its own link is worse; only then does the edge decode and scale
        for it. So a busy edge or a poor patient uplink lowers the source, and the edge keeps
        forwarding what arrives as it is (passthrough), the cheap path.
        """
        patient = self.patient
        patient_link = patient.link.mode if patient else CallMode.FULL
        best_viewer = min((c.link.mode for c in self.clinicians.values()), default=CallMode.FULL)
        self.send_mode = worst(patient_link, self.budget_mode, best_viewer)
        for c in self.clinicians.values():
            if "video" in c.outgoing:
                c.outgoing["video"].set_mode(worst(self.send_mode, c.link.mode), self.send_mode)
        if patient is not None and "video" in patient.outgoing:
            speaking = self.clinicians.get(self.speaking or "")
            patient.outgoing["video"].set_mode(
                worst(patient_link, speaking.link.mode if speaking else CallMode.FULL)
            )
        modes = [patient_link, self.budget_mode, *(c.link.mode for c in self.clinicians.values())]
        mode = worst(*modes)
        if patient is not None and patient.live and patient.silent:
            reason = (
                "no video or audio from the patient for a few seconds: their connection may "
                "have dropped"
            )
        elif mode is CallMode.FULL:
            reason = "good" if patient else "waiting for the patient"
        elif patient is not None and patient_link is mode:
            reason = "patient's " + patient.link.reason
        elif self.budget_mode is mode:
            reason = "edge is busy: the patient sends less, by clinical priority"
        else:
            worst_c = max(self.clinicians.values(), key=lambda c: c.link.mode)
            reason = "clinician's " + worst_c.link.reason
        self.mode, self.reason = mode, reason
        sid = self.session_id
        m = self.metrics
        m.call_mode.labels(**m._labels, session=sid).set(int(mode))
        src = self.patient_video
        m.call_fps.labels(**m._labels, session=sid).set(src.fps if src else 0.0)
        self.publish_state()

    @property
    def patient_video(self) -> CountingTrack | None:
        return self.patient.incoming.get("video") if self.patient else None

    # -- events -------------------------------------------------------------------------

    def state(self) -> media_pb2.CallState:
        src = self.patient_video
        return media_pb2.CallState(
            session_id=self.session_id,
            mode=int(self.mode),  # type: ignore[arg-type]
            patient_connected=self.patient is not None and self.patient.present,
            clinicians_connected=len(self.clinicians),
            patient_fps=src.fps if src else 0.0,
            reason=self.ended or self.reason,
            priority_band=self.news2_band,  # type: ignore[arg-type]
            updated_unix_ns=time.time_ns(),
            send_mode=int(self.send_mode),  # type: ignore[arg-type]
        )

    def publish_state(self, force: bool = False) -> None:
        st = self.state()
        key = (
            st.mode,
            st.send_mode,
            st.patient_connected,
            st.clinicians_connected,
            st.reason,
            st.priority_band,
        )
        now = time.monotonic()
        # Changes go out at once; otherwise a refresh every few seconds keeps fps current.
        if force or key != self._last_state_key or now - self._state_sent_at >= 3.0:
            self._last_state_key = key
            self._state_sent_at = now
            self.events.publish(CallEvent(state=st))

    def publish_hint(self, hint: media_pb2.VisionHint) -> None:
        self.last_hint = hint
        self.events.publish(CallEvent(hint=hint))

    def watch(self, sub: Subscriber[CallEvent]) -> None:
        sub.offer(CallEvent(state=self.state()))
        if self.last_hint is not None:
            sub.offer(CallEvent(hint=self.last_hint))
        self.events.add(sub)

    def unwatch(self, sub: Subscriber[CallEvent]) -> None:
        self.events.remove(sub)
        expiry = self.expiries.pop(id(sub), None)
        if expiry is not None:
            expiry.cancel()

    def end(self, reason: str) -> None:
        self.ended = reason
        self.events.publish(CallEvent(state=self.state()))
        self.events.close_all(reason)
        for t in self.tasks:
            t.cancel()


def remote_tracks(
    peer: Peer, track: MediaStreamTrack, on_stale: Callable[[int], None] | None = None
) -> None:
    """Count a newly received track of a peer (one per kind: a later one replaces)."""
    if track.kind in ("audio", "video"):
        peer.incoming[track.kind] = CountingTrack(
            track, on_stale if track.kind == "video" else None
        )
