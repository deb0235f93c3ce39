"""Every consultation and peer connection on this edge: negotiate, hang up, degrade, close all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from edge_nodes.guard import AuditTrail
from edge_nodes.media.consultation import (
    CLINICIAN,
    PATIENT,
    CallEvent,
    Consultation,
    Peer,
    new_call_id,
    remote_tracks,
)
from edge_nodes.media.passthrough import (
    forward_keyframe_requests,
    install_tap,
    use_marker_jitter_buffer,
)
from edge_nodes.media.ports import UdpPortRange, bind_in_range
from edge_nodes.media.quality import (
    CallMode,
    CpuPressure,
    VideoDemand,
    allocate,
    pressured_budget,
)
from edge_nodes.media.sdp import check_offer
from edge_nodes.media.turn import IceServerConfig, advertise_host_candidates, ice_servers
from edge_nodes.media.vision_tap import VisionWorker
from edge_nodes.vitals.fanout import Subscriber
from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.config import EdgeSettings
from telehealth.errors import (
    DomainError,
    ErrorCode,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from telehealth.security.tokens import SessionClaims, TokenVerifier
from telehealth.telemetry.metrics import MediaMetrics

log = logging.getLogger(__name__)

# As the vitals streams say it (INTERFACES §5): the client attaches again and watches anew.
TOKEN_EXPIRED = "token expired; attach again for a fresh one"

ROLES = (PATIENT, CLINICIAN)
MAX_CLINICIANS = 8
NEGOTIATE_TIMEOUT_S = 10.0
# A peer that has not connected by then (client gone after its offer) is closed.
CONNECT_TIMEOUT_S = 30.0
QUALITY_PERIOD_S = 1.0
# The edge process's CPU is averaged over this long for the budget's pressure (quality.py).
CPU_WINDOW_S = 5.0
# Seconds the edge's budget must allow a better mode before a call is raised to it.
BUDGET_RECOVER_S = 5


class AlreadyConnected(DomainError):
    code = ErrorCode.ALREADY_EXISTS


class Consultations:
    """The owner of every RTCPeerConnection on the edge (aiortc's PeerManager pattern): each is
    registered before anything can fail and closed on hang-up, failure, session release or
    shutdown, so none outlives its call."""

    def __init__(
        self,
        settings: EdgeSettings,
        sessions: EdgeSessions,
        verifier: TokenVerifier,
        metrics: MediaMetrics,
        audit: AuditTrail,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._verifier = verifier
        self.metrics = metrics
        self.audit = audit
        self.ports = UdpPortRange(settings.media_udp_port_min, settings.media_udp_port_max)
        self.vision = VisionWorker(settings.vision_sample_hz)
        self.calls: dict[str, Consultation] = {}
        self.peers: dict[str, Peer] = {}
        self._quality: asyncio.Task[None] | None = None
        # Teardowns started from aiortc callbacks; held so they finish (and close() can wait).
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        # The process's CPU over the last CPU_WINDOW_S, and the budget it leaves (quality loop).
        self._cpu_samples: deque[tuple[float, float]] = deque()
        self._budget = float(settings.media_pixel_budget)
        self._shrunk_at = -1e9
        self.cpu_cores = 0.0

    # -- auth ---------------------------------------------------------------------------

    def authorize(
        self,
        token: str | None,
        session_id: str,
        roles: tuple[str, ...],
        audit_as: str = "",
        peer: str = "",
    ) -> SessionClaims:
        """The token's claims for session_id in one of roles. With audit_as (an action of
        telehealth.security.audit.ACTIONS), a read of patient data: recorded durably before
        anything is sent (AuditTrail.record raises Unavailable when it cannot be), and a
        refusal is recorded as denied."""
        if not session_id:
            raise InvalidArgument("session_id must be set")
        if not self._verifier.has_keys:
            raise Unavailable("edge has not yet received token keys from the core; retry shortly")
        try:
            claims = self._verifier.verify(token, session_id=session_id, roles=roles)
        except DomainError:
            if audit_as:
                self.audit_refusal(token, session_id, audit_as, peer)
            raise
        if audit_as:
            self.audit_read(claims, audit_as, peer)
        return claims

    def audit_read(self, claims: SessionClaims, action: str, peer: str) -> None:
        self.audit.record(
            subject=claims.subject_id or f"session:{claims.session_id}",
            role=claims.role,
            action=action,
            session_id=claims.session_id,
            peer=peer,
        )

    def audit_refusal(self, token: str | None, session_id: str, action: str, peer: str) -> None:
        """A refused read, under the subject of the token only when its signature is ours."""
        self.audit.record_refusal(self._verifier.identify(token), action, session_id, peer)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._quality = asyncio.create_task(self._quality_loop())

    async def close(self, reason: str = "edge is shutting down") -> None:
        self._closing = True
        if self._quality is not None:
            self._quality.cancel()
            await asyncio.gather(self._quality, return_exceptions=True)
        for call in list(self.calls.values()):
            await self._end_call(call, reason)
        await asyncio.gather(*(self._close_peer(p, reason) for p in list(self.peers.values())))
        await asyncio.gather(*list(self._background), return_exceptions=True)
        self.vision.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def peer_count(self) -> int:
        return len(self.peers)

    # -- signalling -----------------------------------------------------------------------

    async def negotiate(
        self, token: str | None, session_id: str, role: str, offer_sdp: str, remote: str = ""
    ) -> tuple[str, str, CallMode]:
        """Answer an offer for session_id as role; return (call_id, answer SDP, call mode).
        A clinician (viewer) receiving the patient's video is a read of patient data: audited
        before the answer goes out."""
        result = "refused"
        try:
            if role not in ROLES:
                raise InvalidArgument(
                    f"role must be publisher (patient) or viewer (clinician), not {role!r}"
                )
            claims = self.authorize(
                token, session_id, (role,), "media.view" if role == CLINICIAN else "", remote
            )
            check_offer(offer_sdp)
            if self._closing:
                raise Unavailable("edge is shutting down; ask the core for a new assignment")
            channel = await self._sessions.channel_for(claims)
            call = self.calls.get(session_id)
            if call is None:
                call = Consultation(
                    session_id, channel, self.metrics, self._settings.media_passthrough
                )
                self.calls[session_id] = call
                call.tasks.append(asyncio.create_task(self._follow(call)))
                call.tasks.append(asyncio.create_task(self.vision.run(call)))
                self.metrics.active_calls.set(len(self.calls))
            peer = await self._reserve(call, role, claims.subject_id)
            try:
                answer = await asyncio.wait_for(
                    self._answer(call, peer, offer_sdp), NEGOTIATE_TIMEOUT_S
                )
            except BaseException:
                await self._close_peer(peer, "negotiation failed")
                raise
            result = "answered"
            log.info(
                "call negotiated",
                extra={"session": session_id, "call": peer.call_id, "role": role},
            )
            return peer.call_id, answer, call.mode
        except TimeoutError:
            raise Unavailable(f"negotiation took longer than {NEGOTIATE_TIMEOUT_S:.0f} s") from None
        finally:
            self.metrics.negotiations.labels(
                **self.metrics._labels, role=role if role in ROLES else "invalid", result=result
            ).inc()

    async def _reserve(self, call: Consultation, role: str, subject_id: str) -> Peer:
        """Register the peer before the first await, so two offers cannot both become patient."""
        if role == PATIENT and call.patient is not None:
            old = call.patient
            if old.live and old.pc.connectionState in ("new", "connecting", "connected"):
                raise AlreadyConnected(
                    f"session {call.session_id} already has a patient device connected; "
                    "hang up that call first (or wait for it to time out)"
                )
            # The old device is gone (its link failed): the new one takes over.
            await self._close_peer(old, "replaced by a new patient connection")
        if role == CLINICIAN and len(call.clinicians) >= MAX_CLINICIANS:
            raise ResourceExhausted(
                f"session {call.session_id} already has {MAX_CLINICIANS} clinicians connected"
            )
        pc = RTCPeerConnection(self._rtc_configuration(call.session_id))
        peer = Peer(new_call_id(), role, call.session_id, pc, subject_id)
        self.peers[peer.call_id] = peer
        self.metrics.peer_connections.set(len(self.peers))
        if role == PATIENT:
            call.patient = peer  # claimed now; attach() wires tracks once negotiated
        pc.add_listener("track", lambda track: self._on_track(call, peer, track))
        pc.add_listener("connectionstatechange", lambda: self._on_state(peer))
        return peer

    async def _answer(self, call: Consultation, peer: Peer, offer_sdp: str) -> str:
        pc = peer.pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise InvalidArgument(
                f"offer SDP was refused by WebRTC ({type(e).__name__}: {e})"
            ) from None
        for t in pc.getTransceivers():
            counted = peer.incoming.get(t.kind)
            if t.kind == "video" or (call.passthrough and counted is not None):
                # Video frames complete on their marker packet, not one frame interval later;
                # forwarded audio is not held back four frames.
                jitter = use_marker_jitter_buffer(t.receiver, t.kind)
                if call.passthrough and counted is not None:
                    counted.tap = install_tap(t.receiver, jitter)
                    counted.tap.on_frame = counted.arrived
                    if t.kind == "video":
                        counted.tap.on_drop = self._count_drop
            if t.kind in ("audio", "video"):
                fwd = call.forwarded_track(t.kind)
                peer.outgoing[t.kind] = fwd
                pc.addTrack(fwd)
        bind_in_range(pc, self.ports)
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        for t in pc.getTransceivers():
            sending = peer.outgoing.get(t.kind)
            if sending is not None:
                codecs = t._codecs  # what the answer negotiated, preferred first
                sending.out_codec = codecs[0].name if codecs else ""
                if t.kind == "video":
                    forward_keyframe_requests(t.sender, sending.request_keyframe)
        call.attach(peer)
        asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self._check_connected, peer)
        # Behind a 1:1 NAT the peer must be told the public address (media_advertise_address).
        return advertise_host_candidates(
            pc.localDescription.sdp, self._settings.media_advertise_address
        )

    def _on_track(self, call: Consultation, peer: Peer, track: MediaStreamTrack) -> None:
        remote_tracks(peer, track, on_stale=lambda n: self._count_drop("stale", n))
        if peer.outgoing:  # already attached: a renegotiated track is rewired
            call.attach(peer)

    def _on_state(self, peer: Peer) -> None:
        state = peer.pc.connectionState
        log.info(
            "peer state", extra={"session": peer.session_id, "call": peer.call_id, "state": state}
        )
        if state in ("failed", "closed") and not peer.closed:
            self._spawn(self._close_peer(peer, f"connection {state}"))

    def _count_drop(self, reason: str, n: int) -> None:
        self.metrics.dropped(reason).inc(n)

    def _check_connected(self, peer: Peer) -> None:
        if not peer.closed and peer.pc.connectionState != "connected":
            self._spawn(self._close_peer(peer, "never connected"))

    def ice_servers(self, token: str | None, session_id: str) -> tuple[list[IceServerConfig], int]:
        """The STUN/TURN servers a peer of this session builds its RTCPeerConnection with, TURN
        with credentials of its own (coturn REST scheme), and when those expire (unix s; 0
        when there are none). Empty when peers reach the edge's UDP range directly."""
        self.authorize(token, session_id, ROLES)
        return self._ice_for(session_id)

    def _ice_for(self, who: str) -> tuple[list[IceServerConfig], int]:
        st = self._settings
        return ice_servers(st.turn_urls, st.turn_secret, who, st.turn_credential_ttl_s)

    def _rtc_configuration(self, session_id: str) -> RTCConfiguration:
        """The edge's own peer: the same servers, so it gathers relayed candidates too when
        it sits behind a NAT that peers cannot cross."""
        servers, _ = self._ice_for(f"{self._settings.edge_id}/{session_id}")
        return RTCConfiguration(
            iceServers=[
                RTCIceServer(
                    urls=list(s.urls), username=s.username or None, credential=s.credential or None
                )
                for s in servers
            ]
        )

    async def hangup(self, token: str | None, session_id: str, call_id: str) -> bool:
        """End one's own call. A token of the session is not enough: a patient must not end
        a clinician's call, nor one clinician another's, so the role and subject of the token
        must be those the call was negotiated with (a refreshed token of the same person
        works)."""
        claims = self.authorize(token, session_id, ROLES)
        peer = self.peers.get(call_id)
        if peer is None:
            return False
        if peer.session_id != session_id:
            raise NotFound(f"call {call_id} is not a call of session {session_id}")
        if claims.role != peer.role or claims.subject_id != peer.subject_id:
            raise PermissionDenied(
                f"call {call_id} is not yours to hang up: it is "
                f"{'a clinician' if peer.role == CLINICIAN else 'the patient'}'s call; "
                "hang up with the token you joined with"
            )
        await self._close_peer(peer, "hung up")
        return True

    def watch(self, claims: SessionClaims) -> tuple[Consultation, Subscriber[CallEvent]]:
        """Follow the session's call until it ends or the token expires (the subscriber is
        closed with TOKEN_EXPIRED then: watch again with a fresh token)."""
        call = self.calls.get(claims.session_id)
        if call is None:
            raise FailedPrecondition(
                f"session {claims.session_id} has no call on this edge yet; negotiate first"
            )
        sub: Subscriber[CallEvent] = Subscriber(64)
        call.watch(sub)
        loop = asyncio.get_running_loop()
        expiry = loop.call_at(
            loop.time() + max(0.0, claims.expires_unix - time.time()), sub.close, TOKEN_EXPIRED
        )
        call.expiries[id(sub)] = expiry
        return call, sub

    async def watch_session(self, session_id: str) -> Consultation:
        """The session's call, created (without peers) so a page can watch before it negotiates."""
        call = self.calls.get(session_id)
        if call is None:
            raise FailedPrecondition(f"session {session_id} has no call on this edge")
        return call

    # -- teardown ---------------------------------------------------------------------------

    async def _close_peer(self, peer: Peer, reason: str) -> None:
        if peer.closed:
            return
        peer.closed = True
        call = self.calls.get(peer.session_id)
        if call is not None:
            call.detach(peer)
        for t in peer.incoming.values():
            t.stop()
        with contextlib.suppress(Exception):
            await peer.pc.close()
        self.peers.pop(peer.call_id, None)
        self.metrics.peer_connections.set(len(self.peers))
        log.info(
            "call ended",
            extra={
                "session": peer.session_id,
                "call": peer.call_id,
                "role": peer.role,
                "reason": reason,
            },
        )
        if call is not None and not call.peers and not self._closing:
            await self._end_call(call, "everyone left")

    async def _end_call(self, call: Consultation, reason: str) -> None:
        if self.calls.get(call.session_id) is not call:
            return
        del self.calls[call.session_id]
        call.end(reason)
        for peer in call.peers:
            await self._close_peer(peer, reason)
        await asyncio.gather(*call.tasks, return_exceptions=True)
        self.metrics.active_calls.set(len(self.calls))
        self.metrics.forget_session(call.session_id)

    async def _follow(self, call: Consultation) -> None:
        reason = await call.follow_vitals()
        # The session moved or closed: its calls end here; peers reconnect at the new edge.
        self._spawn(self._end_call(call, reason))

    # -- quality ------------------------------------------------------------------------------

    async def _quality_loop(self) -> None:
        while True:
            await asyncio.sleep(QUALITY_PERIOD_S)
            try:
                await self.rebalance()
            except Exception:
                log.exception("media quality pass failed")

    def _pixel_budget(self, demand: float) -> float:
        """The configured budget, shrunk while the process's measured CPU is over
        media_cpu_limit (off when 0)."""
        now, cpu = time.monotonic(), time.process_time()
        self._cpu_samples.append((now, cpu))
        while len(self._cpu_samples) > 2 and now - self._cpu_samples[0][0] > CPU_WINDOW_S:
            self._cpu_samples.popleft()
        t0, c0 = self._cpu_samples[0]
        used = (cpu - c0) / (now - t0) if now > t0 else 0.0
        self.cpu_cores = used
        before = self._budget
        self._budget = pressured_budget(
            float(self._settings.media_pixel_budget),
            before,
            demand,
            used,
            CpuPressure(self._settings.media_cpu_limit),
            settling=now - self._shrunk_at < CPU_WINDOW_S,
        )
        if self._budget < before:
            self._shrunk_at = now
        return self._budget

    async def rebalance(self) -> None:
        calls = list(self.calls.values())
        for call in calls:
            await call.sample_links(self._settings.media_silence_s)
        demands = []
        for call in calls:
            src = call.patient_video
            if src is None or not call.clinicians or src.fps <= 0:
                continue
            rate = src.width * src.height * src.fps
            if call.send_mode is CallMode.FULL:
                call.full_pixel_rate = rate
            demands.append(
                VideoDemand(
                    session_id=call.session_id,
                    # What full quality costs, even while the patient is asked to send less.
                    pixel_rate=max(rate, call.full_pixel_rate),
                    viewers=len(call.clinicians),
                    news2_band=call.news2_band,
                    started_unix_ns=call.started_unix_ns,
                )
            )
        budget = allocate(
            demands, self._pixel_budget(sum(d.pixel_rate * d.viewers for d in demands))
        )
        for call in calls:
            allowed = budget.get(call.session_id, CallMode.FULL)
            if allowed > call.budget_mode:
                call.budget_mode, call.budget_ok_s = allowed, 0
            elif allowed < call.budget_mode:
                # Up only after the budget has allowed more for a while: demand jitters by a
                # few fps, and a call at the edge of the budget must not flap.
                call.budget_ok_s += 1
                if call.budget_ok_s >= BUDGET_RECOVER_S:
                    call.budget_mode, call.budget_ok_s = call.budget_mode.step_up(), 0
            else:
                call.budget_ok_s = 0
            call.apply_modes()


def now_ns() -> int:
    return time.time_ns()
