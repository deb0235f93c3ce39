"""What this edge knows of sessions: the core's assignments and one channel per served session."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from edge_nodes.vitals.domain import Limits
from edge_nodes.vitals.pipeline import SessionChannel
from telehealth.errors import FailedPrecondition, NotFound
from telehealth.security.tokens import SessionClaims

log = logging.getLogger(__name__)


@dataclass
class EdgeAssignment:
    session_id: str
    spo2_scale: int
    # Where the archive stood when the core placed the session here.
    archived_seq: int = 0
    patient_id: str = ""
    released: str | None = None
    new_edge_id: str = ""
    new_edge_address: str = ""
    # Set by moving(): where the core is taking the session (make-before-break).
    moving_to: str = ""
    moving_reason: str = ""


class EdgeSessions:
    def __init__(self, edge_id: str, limits: Limits, ecg_window_s: float, wait_s: float) -> None:
        self.edge_id = edge_id
        self._limits = limits
        self._ecg_window_s = ecg_window_s
        self._wait_s = wait_s
        self.assignments: dict[str, EdgeAssignment] = {}
        self.channels: dict[str, SessionChannel] = {}
        self._changed = asyncio.Condition()
        self.draining = False
        # Set when the core should hear about sessions before the next heartbeat period.
        self.report_now = asyncio.Event()

    async def assign(
        self, session_id: str, spo2_scale: int, archived_seq: int = 0, patient_id: str = ""
    ) -> None:
        async with self._changed:
            self.assignments[session_id] = EdgeAssignment(
                session_id, spo2_scale, archived_seq, patient_id
            )
            self._changed.notify_all()

    async def release(self, session_id: str, reason: str, new_edge: str, new_address: str) -> None:
        async with self._changed:
            a = self.assignments.get(session_id)
            if a is None:
                a = EdgeAssignment(session_id, 1)
                self.assignments[session_id] = a
            a.released, a.new_edge_id, a.new_edge_address = reason, new_edge, new_address
            self._changed.notify_all()
        ch = self.channels.pop(session_id, None)
        if ch is not None:
            ch.release(self._released_message(a))

    async def moving(self, session_id: str, new_edge_id: str, reason: str) -> None:
        """The core is moving the session to new_edge_id (drain, rebalance, zone change):
        its publisher gets PublishVitalsResponse.moving and every viewer a moving event,
        and this edge goes on taking batches and serving views until release()."""
        a = self.assignments.get(session_id)
        if a is None or a.released is not None:
            # Nothing served here to warn; the core's release (or assignment) settles it.
            log.info(
                "moving for a session not served here",
                extra={"session": session_id, "edge": self.edge_id},
            )
            return
        a.moving_to, a.moving_reason = new_edge_id, reason
        ch = self.channels.get(session_id)
        if ch is not None:
            ch.move(new_edge_id, reason)
        log.info(
            "session moving",
            extra={"session": session_id, "new_edge": new_edge_id, "reason": reason},
        )

    def _released_message(self, a: EdgeAssignment) -> str:
        if a.released == "moved":
            return (
                f"session {a.session_id} moved to edge {a.new_edge_id} ({a.new_edge_address}); "
                "ask the core for a new assignment"
            )
        return f"session {a.session_id} is {a.released}"

    async def channel_for(self, claims: SessionClaims) -> SessionChannel:
        """The session's channel, once this edge is sure the session is placed here."""
        sid = claims.session_id
        if claims.edge_id and claims.edge_id != self.edge_id:
            raise FailedPrecondition(
                f"session {sid} is placed on edge {claims.edge_id}, not {self.edge_id}; "
                "connect there or ask the core for a new assignment"
            )
        a = self.assignments.get(sid)
        if a is None:
            # The token may arrive before the core's assignment does on the heartbeat stream.
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: sid in self.assignments), self._wait_s
                    )
                except TimeoutError:
                    pass
            a = self.assignments.get(sid)
        if a is None:
            raise NotFound(f"session {sid} is not placed on edge {self.edge_id}")
        if a.released is not None:
            raise FailedPrecondition(self._released_message(a))
        ch = self.channels.get(sid)
        if ch is None:
            ch = SessionChannel(
                sid,
                a.spo2_scale,
                self._limits,
                self._ecg_window_s,
                start_seq=a.archived_seq,
                patient_id=a.patient_id,
            )
            if a.moving_to:
                ch.move(a.moving_to, a.moving_reason)
            self.channels[sid] = ch
        return ch

    @property
    def active(self) -> int:
        return sum(1 for a in self.assignments.values() if a.released is None)

    @property
    def subscribers(self) -> int:
        return sum(ch.subscribers for ch in self.channels.values())
