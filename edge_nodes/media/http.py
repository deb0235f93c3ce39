"""The edge's browser endpoints: offer/answer over HTTP, a WebSocket of live vitals and call
events, and the patient page. Tokens are checked exactly as on the gRPC side."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from edge_nodes.media.consultation import CLINICIAN, PATIENT, CallEvent
from edge_nodes.media.consultations import Consultations
from edge_nodes.media.sdp import MAX_SDP_BYTES
from edge_nodes.vitals.fanout import Subscriber, SubscriberClosed
from edge_nodes.vitals.pipeline import Event
from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.errors import DomainError, ErrorCode, InvalidArgument

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.OUT_OF_RANGE: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
}
# WebSocket close codes in the private range, mirroring the HTTP status (4000 + status).
WS_AUTH_TIMEOUT_S = 5.0
# Tokens are bearer credentials, never cookies, so any origin (the core's console) may call.
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


def error_response(e: DomainError) -> web.Response:
    return web.json_response(
        {"error": e.code.value, "message": e.message}, status=HTTP_STATUS[e.code], headers=CORS
    )


def bearer_of(request: web.Request, body: dict[str, Any]) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[len("Bearer ") :]
    token = body.get("token")
    return token if isinstance(token, str) else None


def to_json(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True)


class MediaHttp:
    def __init__(self, calls: Consultations, sessions: EdgeSessions) -> None:
        self._calls = calls
        self._sessions = sessions

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("OPTIONS", "/media/{tail:.*}", self._preflight)
        app.router.add_post("/media/sessions/{session_id}/offer", self.offer)
        app.router.add_post("/media/sessions/{session_id}/calls/{call_id}/hangup", self.hangup)
        app.router.add_get("/media/ws", self.websocket)
        app.router.add_get("/patient", self.patient_page)
        app.router.add_static("/static/media/", STATIC, append_version=False)

    async def _preflight(self, _: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_SDP_BYTES * 2:
            raise InvalidArgument(f"request body larger than {MAX_SDP_BYTES * 2} bytes")
        try:
            body = json.loads(await request.text() or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"body must be JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidArgument("body must be a JSON object")
        return body

    async def offer(self, request: web.Request) -> web.Response:
        """POST {"sdp": offer, "role": "publisher"|"viewer"[, "token"]} -> {"sdp": answer, ...}."""
        try:
            body = await self._body(request)
            sdp = body.get("sdp")
            role = body.get("role")
            if not isinstance(sdp, str) or not isinstance(role, str):
                raise InvalidArgument('body needs "sdp" (the offer) and "role" as strings')
            call_id, answer, mode = await self._calls.negotiate(
                bearer_of(request, body), request.match_info["session_id"], role, sdp
            )
        except DomainError as e:
            return error_response(e)
        return web.json_response(
            {"call_id": call_id, "type": "answer", "sdp": answer, "mode": mode.name},
            headers=CORS,
        )

    async def hangup(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            ended = await self._calls.hangup(
                bearer_of(request, body),
                request.match_info["session_id"],
                request.match_info["call_id"],
            )
        except DomainError as e:
            return error_response(e)
        return web.json_response({"ended": ended}, headers=CORS)

    async def patient_page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "patient.html")

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Live vitals and call events of one session as JSON.

        A browser cannot put headers on a WebSocket and a token in the URL ends up in logs, so
        the first message carries it: {"session_id": ..., "token": ...}.
        """
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        try:
            try:
                hello = await ws.receive_json(timeout=WS_AUTH_TIMEOUT_S)
            except (TimeoutError, ValueError, TypeError):
                raise InvalidArgument(
                    'first message must be JSON {"session_id": ..., "token": ...} within '
                    f"{WS_AUTH_TIMEOUT_S:.0f} s"
                ) from None
            if not isinstance(hello, dict):
                raise InvalidArgument("first message must be a JSON object")
            claims = self._calls.authorize(
                hello.get("token"), str(hello.get("session_id", "")), (PATIENT, CLINICIAN)
            )
            channel = await self._sessions.channel_for(claims)
        except DomainError as e:
            await ws.send_json({"type": "error", "error": e.code.value, "message": e.message})
            await ws.close(code=4000 + HTTP_STATUS[e.code], message=e.code.value.encode())
            return ws
        sid = claims.session_id
        await ws.send_json({"type": "welcome", "session_id": sid, "role": claims.role})
        vitals: Subscriber[Event] = Subscriber(256)
        channel.subscribe(vitals, include_latest=True)
        pumps = [
            asyncio.create_task(self._pump_vitals(ws, vitals)),
            asyncio.create_task(self._pump_calls(ws, sid)),
        ]
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            channel.fanout.remove(vitals)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    async def _pump_vitals(self, ws: web.WebSocketResponse, sub: Subscriber[Event]) -> None:
        while True:
            try:
                dropped, events = await sub.take()
            except SubscriberClosed as closed:
                # The session moved or closed: the page shows why and asks the core again.
                await ws.send_json({"type": "session_released", "message": closed.reason})
                await ws.close(code=4409, message=b"session released")
                return
            if dropped:
                await ws.send_json({"type": "gap", "dropped_events": dropped})
            for ev in events:
                kind = ev.WhichOneof("event")
                await ws.send_json(
                    {
                        "type": kind,
                        "edge_received_unix_ns": ev.edge_received_unix_ns,
                        kind or "event": to_json(getattr(ev, kind)) if kind else {},
                    }
                )

    async def _pump_calls(self, ws: web.WebSocketResponse, session_id: str) -> None:
        while True:
            call = self._calls.calls.get(session_id)
            if call is None:
                # No call yet (or the last one ended): the page is still told the state.
                await asyncio.sleep(0.25)
                continue
            sub: Subscriber[CallEvent] = Subscriber(64)
            call.watch(sub)
            try:
                while True:
                    try:
                        _, events = await sub.take()
                    except SubscriberClosed:
                        break
                    for ev in events:
                        kind = ev.WhichOneof("event") or ""
                        await ws.send_json(
                            {"type": "call_" + kind, kind: to_json(getattr(ev, kind))}
                        )
            finally:
                call.events.remove(sub)
