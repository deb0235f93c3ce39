"""gRPC edge of the audit log: edges append their records of patient-data reads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from core_services.audit.store import SqlAuditLog
from telehealth.errors import DomainError, InvalidArgument, ResourceExhausted
from telehealth.rpc import Context
from telehealth.security.audit import ACTIONS, AuditEvent
from telehealth.v1 import audit_pb2, audit_pb2_grpc

MAX_RECORDS = 1000


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, log: SqlAuditLog, patient_of: Callable[[str], Awaitable[str]]) -> None:
        self._log = log
        self._patient_of = patient_of
        # Highest edge_seq appended per (edge, boot): a batch resent after a lost reply is
        # skipped. Kept in memory; after a core restart a resent batch may appear twice,
        # which over-reports a read but never hides one.
        self._acked: dict[tuple[str, str], int] = {}

    async def Append(
        self, request: audit_pb2.AppendAuditRequest, context: Context
    ) -> audit_pb2.AppendAuditResponse:
        if len(request.records) > MAX_RECORDS:
            raise ResourceExhausted(f"at most {MAX_RECORDS} records per append")
        if not request.edge_boot_id:
            raise InvalidArgument("edge_boot_id must be set")
        key = (request.edge_id, request.edge_boot_id[:64])
        acked = self._acked.get(key, 0)
        events = []
        high = acked
        for r in request.records:
            if r.edge_seq <= acked:
                continue
            if r.action not in ACTIONS:
                raise InvalidArgument(f"unknown audit action {r.action[:64]!r}")
            patient = r.patient_id
            if not patient and r.session_id:
                try:
                    patient = await self._patient_of(r.session_id)
                except DomainError:  # an unknown session is still worth recording
                    patient = ""
            events.append(
                AuditEvent(
                    at_unix_ns=r.at_unix_ns,
                    subject=r.subject,
                    role=r.role,
                    action=r.action,
                    patient_id=patient,
                    session_id=r.session_id,
                    peer=r.peer,
                    source=request.edge_id,
                    outcome=r.outcome or "allowed",
                )
            )
            high = max(high, r.edge_seq)
        entries = await self._log.append(events)
        if len(self._acked) > 10_000:
            self._acked.clear()
        self._acked[key] = high
        return audit_pb2.AppendAuditResponse(
            acked_edge_seq=high, last_chain_seq=entries[-1].seq if entries else 0
        )
