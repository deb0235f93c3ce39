"""gRPC edge of the edge registry: the Heartbeat stream, ListEdges and Drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from core_services.convert import edge_pb, session_pb
from core_services.edges.registry import (
    AssignSession,
    Command,
    EdgeRegistry,
    EndStream,
    MoveSession,
    PushTokenKeys,
    ReleaseSession,
    SetDraining,
)
from core_services.sessions.directory import SessionDirectory
from core_services.sessions.domain import LiveReport
from telehealth.errors import InvalidArgument, Unavailable
from telehealth.rpc import Context
from telehealth.security.tokens import KeyRing
from telehealth.v1 import edges_pb2, edges_pb2_grpc

log = logging.getLogger(__name__)


class EdgesServicer(edges_pb2_grpc.EdgesServiceServicer):
    def __init__(self, registry: EdgeRegistry, directory: SessionDirectory, keys: KeyRing) -> None:
        self._registry = registry
        self._directory = directory
        self._keys = keys

    def _command_pb(self, c: Command) -> edges_pb2.HeartbeatResponse:
        now = time.time_ns()
        if isinstance(c, AssignSession):
            s = c.session
            return edges_pb2.HeartbeatResponse(
                sent_unix_ns=now,
                assigned=edges_pb2.SessionAssigned(
                    session=session_pb(
                        s, None, self._directory.address_of(s), archived_seq=c.archived_seq
                    )
                ),
            )
        if isinstance(c, ReleaseSession):
            return edges_pb2.HeartbeatResponse(
                sent_unix_ns=now,
                released=edges_pb2.SessionReleased(
                    session_id=c.session_id,
                    reason=c.reason,
                    new_edge_id=c.new_edge_id,
                    new_edge_address=c.new_edge_address,
                ),
            )
        if isinstance(c, MoveSession):
            return edges_pb2.HeartbeatResponse(
                sent_unix_ns=now,
                moving=edges_pb2.SessionMovingCommand(
                    session_id=c.session_id, new_edge_id=c.new_edge_id, reason=c.reason
                ),
            )
        if isinstance(c, PushTokenKeys):
            return self._keys_pb()
        assert isinstance(c, SetDraining)
        return edges_pb2.HeartbeatResponse(
            sent_unix_ns=now, drain=edges_pb2.DrainEdge(draining=c.draining)
        )

    def _keys_pb(self) -> edges_pb2.HeartbeatResponse:
        return edges_pb2.HeartbeatResponse(
            sent_unix_ns=time.time_ns(),
            token_keys=edges_pb2.TokenKeys(
                keys=[
                    edges_pb2.TokenKey(kid=kid, ed25519_public_key=raw)
                    for kid, raw in self._keys.public_keys().items()
                ]
            ),
        )

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[edges_pb2.HeartbeatRequest],
        context: Context,
    ) -> AsyncIterator[edges_pb2.HeartbeatResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not first.edge_id or not first.zone or not first.address:
            raise InvalidArgument("the first heartbeat must name edge_id, zone and address")
        edge_id = first.edge_id
        entry, outbox = await self._registry.connect(
            edge_id,
            first.zone,
            first.address,
            first.load.capacity_sessions or 1000,
            first.tls_server_name,
        )
        token = entry.stream_token
        await self._apply(first, token)
        # Everything the edge must know to serve: keys, its sessions, whether it is draining.
        # (What it reported but no longer holds is already queued as releases by _apply.)
        yield self._keys_pb()
        for s in self._directory.sessions_on(edge_id):
            yield self._command_pb(await self._directory.assignment_command(s))
        for m in self._directory.moves_from(edge_id):
            yield self._command_pb(m)  # moves it may have missed while away
        if entry.draining:
            yield self._command_pb(SetDraining(True))

        async def read() -> None:
            async for req in request_iterator:
                if req.edge_id != edge_id:
                    raise InvalidArgument(
                        f"heartbeat stream of {edge_id} cannot report for {req.edge_id}"
                    )
                await self._apply(req, token)

        reader = asyncio.create_task(read())
        try:
            while True:
                get = asyncio.create_task(outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    command = get.result()
                    if isinstance(command, EndStream):
                        # UNAVAILABLE: the edge treats it as a lost link and registers again.
                        raise Unavailable(f"{command.reason}; register again")
                    yield self._command_pb(command)
                    continue
                get.cancel()
                reader.result()  # re-raise a reader error as this stream's status
                return
        finally:
            reader.cancel()
            self._registry.disconnect(edge_id, token)
            log.info("edge heartbeat stream ended", extra={"edge": edge_id})

    async def _apply(self, req: edges_pb2.HeartbeatRequest, token: object) -> None:
        if not self._registry.is_current(req.edge_id, token):
            # A stream the core ended (it declared the edge dead) or a newer one replaced:
            # its beats must not keep the edge alive; the edge registers again.
            return
        if req.http_address:
            self._registry.edges[req.edge_id].http_address = req.http_address
        self._registry.heartbeat(
            req.edge_id,
            active_sessions=req.load.active_sessions,
            subscribers=req.load.subscribers,
            capacity=req.load.capacity_sessions,
            cpu_percent=req.load.cpu_percent,
            batches_in_total=req.load.batches_in_total,
        )
        # Whatever it holds that the directory places elsewhere (or closed) is let go there
        # (apply_heartbeat reconciles), so its device moves on at once.
        await self._directory.apply_heartbeat(
            req.edge_id,
            token,
            [
                (
                    r.session_id,
                    LiveReport(
                        last_seq=r.last_seq,
                        news2_total=r.news2_total,
                        news2_band=int(r.news2_band),
                        news2_unix_ns=r.news2_unix_ns,
                        subscribers=r.subscribers,
                        publishers=r.publishers,
                        assigned=r.assigned,
                    ),
                )
                for r in req.sessions
            ],
        )

    async def ListEdges(
        self, request: edges_pb2.ListEdgesRequest, context: Context
    ) -> edges_pb2.ListEdgesResponse:
        return edges_pb2.ListEdgesResponse(
            edges=[
                edge_pb(e, self._registry.placed.get(e.edge_id, 0))
                for e in sorted(self._registry.edges.values(), key=lambda e: e.edge_id)
                if not request.zone or e.zone == request.zone
            ]
        )

    async def Drain(
        self, request: edges_pb2.DrainEdgeRequest, context: Context
    ) -> edges_pb2.DrainEdgeResponse:
        e = await self._registry.set_draining(request.edge_id, request.draining)
        if request.draining:
            await self._directory.drain(request.edge_id)
        return edges_pb2.DrainEdgeResponse(edge=edge_pb(e, self._registry.placed.get(e.edge_id, 0)))
