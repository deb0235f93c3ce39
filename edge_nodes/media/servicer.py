"""gRPC edge of the media context: Negotiate, Hangup and WatchCall for programs."""

from __future__ import annotations

from collections.abc import AsyncIterator

from edge_nodes.media.consultation import CLINICIAN, PATIENT
from edge_nodes.media.consultations import TOKEN_EXPIRED, Consultations
from edge_nodes.vitals.fanout import SubscriberClosed
from telehealth.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from telehealth.rpc import Context, token_from
from telehealth.v1 import media_pb2, media_pb2_grpc, sessions_pb2

ROLE_NAMES = {sessions_pb2.ROLE_PUBLISHER: PATIENT, sessions_pb2.ROLE_VIEWER: CLINICIAN}


class MediaServicer(media_pb2_grpc.MediaServiceServicer):
    def __init__(self, calls: Consultations) -> None:
        self._calls = calls

    async def Negotiate(
        self, request: media_pb2.NegotiateMediaRequest, context: Context
    ) -> media_pb2.NegotiateMediaResponse:
        role = ROLE_NAMES.get(request.role)
        if role is None:
            raise InvalidArgument(
                "role must be ROLE_PUBLISHER (patient) or ROLE_VIEWER (clinician)"
            )
        call_id, answer, mode = await self._calls.negotiate(
            token_from(context.invocation_metadata()),
            request.session_id,
            role,
            request.offer_sdp,
            remote=context.peer() or "",
        )
        return media_pb2.NegotiateMediaResponse(
            call_id=call_id,
            answer_sdp=answer,
            mode=int(mode),  # type: ignore[arg-type]
        )

    async def GetIceServers(
        self, request: media_pb2.GetIceServersRequest, context: Context
    ) -> media_pb2.GetIceServersResponse:
        servers, expiry = self._calls.ice_servers(
            token_from(context.invocation_metadata()), request.session_id
        )
        return media_pb2.GetIceServersResponse(
            ice_servers=[
                media_pb2.IceServer(urls=list(s.urls), username=s.username, credential=s.credential)
                for s in servers
            ],
            expires_unix_ns=expiry * 1_000_000_000,
        )

    async def Hangup(
        self, request: media_pb2.HangupMediaRequest, context: Context
    ) -> media_pb2.HangupMediaResponse:
        ended = await self._calls.hangup(
            token_from(context.invocation_metadata()), request.session_id, request.call_id
        )
        return media_pb2.HangupMediaResponse(ended=ended)

    async def WatchCall(
        self, request: media_pb2.WatchCallRequest, context: Context
    ) -> AsyncIterator[media_pb2.WatchCallResponse]:
        # The call's state and the vision hints describe the patient: an audited read.
        claims = self._calls.authorize(
            token_from(context.invocation_metadata()),
            request.session_id,
            (PATIENT, CLINICIAN),
            audit_as="media.watch",
            peer=context.peer() or "",
        )
        call, sub = self._calls.watch(claims)
        try:
            while True:
                try:
                    _, events = await sub.take()
                except SubscriberClosed as closed:
                    if closed.reason == TOKEN_EXPIRED:
                        raise Unauthenticated(TOKEN_EXPIRED) from None
                    raise FailedPrecondition(f"call ended: {closed.reason}") from None
                for ev in events:
                    yield ev
        finally:
            call.unwatch(sub)
