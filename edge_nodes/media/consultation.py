"""One session's video consultation at the edge: the patient's peer, clinicians' peers, relay."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
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
    lost: int = 0
    received: int = 0


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
    uplink: LinkCounters = field(default_factory=LinkCounters)
    downlink: LinkCounters = field(default_factory=LinkCounters)
    closed: bool = False

    @property
    def live(self) -> bool:
        return not self.closed and self.pc.connectionState not in ("failed", "closed")


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
        self.reason = "waiting for the patient"
        self.budget_mode = CallMode.FULL
        self.news2_band = 0
        self.started_unix_ns = time.time_ns()
        self.ended: str | None = None
        self.last_hint: media_pb2.VisionHint | None = None
        self._last_state_key: tuple[object, ...] = ()
        self._state_sent_at = 0.0
        self.tasks: list[asyncio.Task[None]] = []

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

    async def sample_links(self) -> None:
        """Feed one second of RTCP figures of every peer into its link controller."""
        for peer in self.peers:
            if not peer.live or peer.pc.connectionState != "connected":
                continue
            try:
                report = await peer.pc.getStats()
            except Exception:  # a peer closing under us: next second will not see it
                continue
            up_lost = up_recv = down_lost = down_recv = 0
            rtts: list[float] = []
            for s in report.values():
                kind = getattr(s, "kind", "")
                if s.type == "inbound-rtp" and kind == "video":
                    up_lost += max(0, int(s.packetsLost))
                    up_recv += int(s.packetsReceived)
                elif s.type == "remote-inbound-rtp":
                    # None until the first RTCP receiver report with a round trip arrives.
                    if s.roundTripTime is not None:
                        rtts.append(float(s.roundTripTime))
                    if kind == "video":
                        down_lost += max(0, int(s.packetsLost))
                        down_recv += int(s.packetsReceived)
            loss = 0.0
            for counters, lost, recv in (
                (peer.uplink, up_lost, up_recv),
                (peer.downlink, down_lost, down_recv),
            ):
                d_lost, d_recv = lost - counters.lost, recv - counters.received
                counters.lost, counters.received = lost, recv
                if d_lost > 0 and d_lost + d_recv > 0:
                    loss = max(loss, d_lost / (d_lost + d_recv))
            peer.link.update(LinkSample(loss, max(rtts) if rtts else None))

    def apply_modes(self) -> None:
        """Set each forwarded video to the worst of the links it crosses and the edge budget."""
        patient_link = self.patient.link.mode if self.patient else CallMode.FULL
        for c in self.clinicians.values():
            mode = worst(patient_link, c.link.mode, self.budget_mode)
            if "video" in c.outgoing:
                c.outgoing["video"].set_mode(mode)
        if self.patient is not None and "video" in self.patient.outgoing:
            speaking = self.clinicians.get(self.speaking or "")
            self.patient.outgoing["video"].set_mode(
                worst(patient_link, speaking.link.mode if speaking else CallMode.FULL)
            )
        modes = [patient_link, self.budget_mode, *(c.link.mode for c in self.clinicians.values())]
        mode = worst(*modes)
        if mode is CallMode.FULL:
            reason = "good" if self.patient else "waiting for the patient"
        elif self.patient is not None and patient_link is mode:
            reason = "patient's " + self.patient.link.reason
        elif self.budget_mode is mode:
            reason = "edge is busy: video shared by clinical priority"
        else:
            worst_c = max(self.clinicians.values(), key=lambda c: c.link.mode)
            reason = "clinician's " + worst_c.link.reason
        self.mode, self.reason = mode, reason
        sid = self.session_id
        m = self.metrics
        m.call_mode.labels(**m._labels, session=sid).set(int(mode))
        src = self.patient.incoming.get("video") if self.patient else None
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
            patient_connected=self.patient is not None and self.patient.live,
            clinicians_connected=len(self.clinicians),
            patient_fps=src.fps if src else 0.0,
            reason=self.ended or self.reason,
            priority_band=self.news2_band,  # type: ignore[arg-type]
            updated_unix_ns=time.time_ns(),
        )

    def publish_state(self, force: bool = False) -> None:
        st = self.state()
        key = (st.mode, st.patient_connected, st.clinicians_connected, st.reason, st.priority_band)
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

    def end(self, reason: str) -> None:
        self.ended = reason
        self.events.publish(CallEvent(state=self.state()))
        self.events.close_all(reason)
        for t in self.tasks:
            t.cancel()


def remote_tracks(peer: Peer, track: MediaStreamTrack) -> None:
    """Count a newly received track of a peer (one per kind: a later one replaces)."""
    if track.kind in ("audio", "video"):
        peer.incoming[track.kind] = CountingTrack(track)
