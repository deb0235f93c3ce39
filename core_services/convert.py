"""Conversions between the core's domain objects and telehealth.v1 messages."""

from __future__ import annotations

from core_services.edges.registry import EdgeEntry
from core_services.sessions.directory import Assignment
from core_services.sessions.domain import EdgeState, LiveReport, Session, SessionState
from telehealth.v1 import edges_pb2, sessions_pb2

ROLE_NAMES = {
    sessions_pb2.ROLE_PUBLISHER: "publisher",
    sessions_pb2.ROLE_VIEWER: "viewer",
    sessions_pb2.ROLE_OPERATOR: "operator",
}
ROLE_VALUES = {v: k for k, v in ROLE_NAMES.items()}


def session_pb(
    s: Session, live: LiveReport | None, address: str, archived_seq: int = 0
) -> sessions_pb2.Session:
    live = live or LiveReport()
    return sessions_pb2.Session(
        session_id=s.session_id,
        patient_id=s.patient_id,
        zone=s.zone,
        edge_id=s.edge_id,
        edge_address=address,
        state=sessions_pb2.SESSION_STATE_OPEN
        if s.state is SessionState.OPEN
        else sessions_pb2.SESSION_STATE_CLOSED,
        spo2_scale=s.spo2_scale,  # type: ignore[arg-type]
        opened_unix_ns=s.opened_unix_ns,
        closed_unix_ns=s.closed_unix_ns,
        news2_total=live.news2_total,
        news2_band=live.news2_band,  # type: ignore[arg-type]
        news2_unix_ns=live.news2_unix_ns,
        last_seq=live.last_seq,
        placements=s.placements,
        archived_seq=archived_seq,
    )


def assignment_pb(a: Assignment) -> sessions_pb2.Assignment:
    return sessions_pb2.Assignment(
        session_id=a.session_id,
        edge_id=a.edge_id,
        edge_address=a.edge_address,
        token=a.token,
        token_expires_unix_ns=a.expires_unix_ns,
        role=ROLE_VALUES[a.role],
        edge_tls_server_name=a.edge_tls_server_name,
    )


EDGE_STATE_PB = {
    EdgeState.HEALTHY: edges_pb2.EDGE_STATE_HEALTHY,
    EdgeState.DRAINING: edges_pb2.EDGE_STATE_DRAINING,
    EdgeState.DEAD: edges_pb2.EDGE_STATE_DEAD,
}


def edge_pb(e: EdgeEntry, placed: int) -> edges_pb2.EdgeNode:
    return edges_pb2.EdgeNode(
        edge_id=e.edge_id,
        zone=e.zone,
        address=e.address,
        state=EDGE_STATE_PB[e.state],
        load=edges_pb2.EdgeLoad(
            active_sessions=e.reported_sessions,
            subscribers=e.subscribers,
            capacity_sessions=e.capacity_sessions,
            cpu_percent=e.cpu_percent,
            batches_in_total=e.batches_in_total,
        ),
        last_heartbeat_unix_ns=e.last_heartbeat_unix_ns,
        placed_sessions=placed,
        http_address=e.http_address,
        tls_server_name=e.tls_server_name,
    )
