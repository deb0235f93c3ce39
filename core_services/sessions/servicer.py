"""gRPC edge of the sessions context: messages in, domain calls, messages out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from core_services.convert import ROLE_NAMES, assignment_pb, session_pb
from core_services.sessions.directory import EventKind, SessionDirectory
from core_services.sessions.domain import Session
from telehealth.errors import InvalidArgument
from telehealth.rpc import Context
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc

EVENT_KIND_PB = {
    EventKind.SNAPSHOT: sessions_pb2.SESSION_EVENT_KIND_SNAPSHOT,
    EventKind.OPENED: sessions_pb2.SESSION_EVENT_KIND_OPENED,
    EventKind.MOVED: sessions_pb2.SESSION_EVENT_KIND_MOVED,
    EventKind.CLOSED: sessions_pb2.SESSION_EVENT_KIND_CLOSED,
    EventKind.UPDATED: sessions_pb2.SESSION_EVENT_KIND_UPDATED,
}


class SessionsServicer(sessions_pb2_grpc.SessionsServiceServicer):
    def __init__(self, directory: SessionDirectory) -> None:
        self._d = directory

    def _pb(self, s: Session) -> sessions_pb2.Session:
        return session_pb(s, self._d.live.get(s.session_id), self._d.address_of(s))

    async def Open(
        self, request: sessions_pb2.OpenSessionRequest, context: Context
    ) -> sessions_pb2.OpenSessionResponse:
        s, a = await self._d.open(
            patient_id=request.patient_id,
            zone=request.zone,
            spo2_scale=int(request.spo2_scale),
            device_id=request.device_id,
        )
        return sessions_pb2.OpenSessionResponse(session=self._pb(s), assignment=assignment_pb(a))

    async def Attach(
        self, request: sessions_pb2.AttachSessionRequest, context: Context
    ) -> sessions_pb2.AttachSessionResponse:
        role = ROLE_NAMES.get(request.role)
        if role is None:
            raise InvalidArgument("role must be ROLE_PUBLISHER, ROLE_VIEWER or ROLE_OPERATOR")
        s, a = await self._d.attach(request.session_id, role, request.unreachable_edge_id)
        return sessions_pb2.AttachSessionResponse(session=self._pb(s), assignment=assignment_pb(a))

    async def Close(
        self, request: sessions_pb2.CloseSessionRequest, context: Context
    ) -> sessions_pb2.CloseSessionResponse:
        s = await self._d.close(request.session_id)
        return sessions_pb2.CloseSessionResponse(session=self._pb(s))

    async def ChangeZone(
        self, request: sessions_pb2.ChangeZoneRequest, context: Context
    ) -> sessions_pb2.ChangeZoneResponse:
        if not request.zone:
            raise InvalidArgument("zone must be set")
        s, moved = await self._d.relocate(request.session_id, "zone_change", request.zone)
        _, a = await self._d.attach(s.session_id, "publisher")
        return sessions_pb2.ChangeZoneResponse(
            session=self._pb(s), assignment=assignment_pb(a), moved=moved
        )

    async def List(
        self, request: sessions_pb2.ListSessionsRequest, context: Context
    ) -> sessions_pb2.ListSessionsResponse:
        if request.include_closed:
            found = [
                s
                for s in await self._d.list_with_closed()
                if (not request.zone or s.zone == request.zone)
                and (not request.edge_id or s.edge_id == request.edge_id)
            ]
        else:
            found = self._d.open_list(zone=request.zone, edge_id=request.edge_id)
        return sessions_pb2.ListSessionsResponse(sessions=[self._pb(s) for s in found])

    async def Watch(
        self, request: sessions_pb2.WatchSessionsRequest, context: Context
    ) -> AsyncIterator[sessions_pb2.WatchSessionsResponse]:
        async for ev in self._d.watch(request.session_id):
            yield sessions_pb2.WatchSessionsResponse(
                kind=EVENT_KIND_PB[ev.kind],
                session=session_pb(ev.session, ev.live, ev.address),
                event_unix_ns=ev.unix_ns,
            )
