"""The edge's browser endpoints: offer/answer over HTTP, a WebSocket of live vitals and call
events, and the patient page. Tokens are checked exactly as on the gRPC side."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from edge_nodes.guard import REFUSALS, EdgeGuard
from edge_nodes.media.consultation import CLINICIAN, PATIENT, CallEvent
from edge_nodes.media.consultations import TOKEN_EXPIRED, Consultations
from edge_nodes.media.sdp import MAX_SDP_BYTES
from edge_nodes.vitals.fanout import Subscriber, SubscriberClosed
from edge_nodes.vitals.pipeline import Event, SessionChannel
from edge_nodes.vitals.servicer import VitalsServicer
from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.errors import HTTP_STATUS, DomainError, InvalidArgument

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
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
    def __init__(
        self,
        calls: Consultations,
        sessions: EdgeSessions,
        guard: EdgeGuard,
        vitals: VitalsServicer,
    ) -> None:
        self._calls = calls
        self._sessions = sessions
        self._guard = guard
        self._vitals = vitals

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("OPTIONS", "/media/{tail:.*}", self._preflight)
        app.router.add_post("/media/sessions/{session_id}/offer", self.offer)
        app.router.add_post("/media/sessions/{session_id}/ice-servers", self.ice_servers)
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
                bearer_of(request, body),
                request.match_info["session_id"],
                role,
                sdp,
                remote=request.remote or "",
            )
        except DomainError as e:
            return error_response(e)
        return web.json_response(
            {"call_id": call_id, "type": "answer", "sdp": answer, "mode": mode.name},
            headers=CORS,
        )

    async def ice_servers(self, request: web.Request) -> web.Response:
        """POST (bearer token) -> {"ice_servers": [{urls, username, credential}],
        "expires_unix_ms"}: what the page builds its RTCPeerConnection with."""
        try:
            body = await self._body(request)
            servers, expiry = self._calls.ice_servers(
                bearer_of(request, body), request.match_info["session_id"]
            )
        except DomainError as e:
            return error_response(e)
        return web.json_response(
            {
                "ice_servers": [
                    {"urls": list(s.urls), "username": s.username, "credential": s.credential}
                    if s.username
                    else {"urls": list(s.urls)}
                    for s in servers
                ],
                "expires_unix_ms": expiry * 1000,
            },
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
        the first message carries it: {"session_id": ..., "token": ...[, "resume_after_seq":
        N]}. With resume_after_seq the batches after N that this edge holds are replayed first
        (then live, without duplicates; a "gap" event names what it does not hold), so a view
        that moves edges or renews its token loses nothing. Like gRPC Subscribe, a view takes
        one of the session's viewer places and is audited before any data goes out; it ends
        with an "error" (unauthenticated, close code 4401) when its token expires.
        """
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        peer = request.remote or ""
        slot: contextlib.AbstractContextManager[None] | None = None
        token: str | None = None
        sid = ""
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
            resume_after = hello.get("resume_after_seq", 0) or 0
            if (
                not isinstance(resume_after, int)
                or isinstance(resume_after, bool)
                or resume_after < 0
            ):
                raise InvalidArgument("resume_after_seq must be a whole number >= 0")
            sid = str(hello.get("session_id", ""))
            raw = hello.get("token")
            token = raw if isinstance(raw, str) else None
            try:
                claims = self._calls.authorize(token, sid, (PATIENT, CLINICIAN))
                channel = await self._sessions.channel_for(claims)
                slot = self._guard.viewer_slot(sid)
                slot.__enter__()
                # Durable before the first event leaves the edge (raises when it cannot be).
                self._calls.audit_read(claims, "vitals.subscribe", peer)
            except DomainError as e:
                if slot is not None:
                    slot.__exit__(None, None, None)
                    slot = None
                if sid and e.code in REFUSALS:
                    self._calls.audit_refusal(token, sid, "vitals.subscribe", peer)
                raise
        except DomainError as e:
            await ws.send_json({"type": "error", "error": e.code.value, "message": e.message})
            await ws.close(code=4000 + HTTP_STATUS[e.code], message=e.code.value.encode())
            return ws
        assert slot is not None
        await ws.send_json(
            {
                "type": "welcome",
                "session_id": sid,
                "role": claims.role,
                "token_expires_unix_ms": claims.expires_unix * 1000,
            }
        )
        vitals: Subscriber[Event] = Subscriber(256)
        # Live events queue from here on, so the replay and the live events overlap rather
        # than leave a hole between them.
        channel.subscribe(vitals, include_latest=True)
        loop = asyncio.get_running_loop()
        expiry = loop.call_at(
            loop.time() + max(0.0, claims.expires_unix - time.time()), vitals.close, TOKEN_EXPIRED
        )
        pumps = [
            asyncio.create_task(self._pump_vitals(ws, channel, vitals, resume_after)),
            asyncio.create_task(self._pump_calls(ws, sid)),
        ]
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
        finally:
            expiry.cancel()
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            channel.fanout.remove(vitals)
            slot.__exit__(None, None, None)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    async def _send(self, ws: web.WebSocketResponse, ev: Event) -> None:
        kind = ev.WhichOneof("event")
        await ws.send_json(
            {
                "type": kind,
                "edge_received_unix_ns": ev.edge_received_unix_ns,
                kind or "event": to_json(getattr(ev, kind)) if kind else {},
            }
        )

    async def _pump_vitals(
        self,
        ws: web.WebSocketResponse,
        channel: SessionChannel,
        sub: Subscriber[Event],
        resume_after: int,
    ) -> None:
        # Seqs replayed from the journal (engineer A1's replay, the one gRPC Subscribe uses):
        # their live copies, queued meanwhile, are skipped once.
        replayed: set[int] = set()
        if resume_after:
            async for ev in self._vitals._replay(channel, resume_after, replayed):
                await self._send(ws, ev)
        while True:
            try:
                dropped, events = await sub.take()
            except SubscriberClosed as closed:
                if closed.reason == TOKEN_EXPIRED:
                    await ws.send_json(
                        {"type": "error", "error": "unauthenticated", "message": TOKEN_EXPIRED}
                    )
                    await ws.close(code=4401, message=b"token expired")
                    return
                # The session moved or closed: the page shows why and asks the core again.
                await ws.send_json({"type": "session_released", "message": closed.reason})
                await ws.close(code=4409, message=b"session released")
                return
            if dropped:
                await ws.send_json(
                    {
                        "type": "gap",
                        "dropped_events": dropped,
                        "gap": {"dropped_events": dropped, "reason": "view fell behind"},
                    }
                )
            for ev in events:
                if ev.HasField("batch"):
                    seq = ev.batch.seq
                    # seq 0 is the latest-values snapshot, not a published batch.
                    if seq and (seq <= resume_after or seq in replayed):
                        continue
                await self._send(ws, ev)
            # Every live copy of a replayed batch was queued before the replay ended.
            replayed.clear()

    async def _pump_calls(self, ws: web.WebSocketResponse, session_id: str) -> None:
        while True:
            call = self._calls.calls.get(session_id)
            if call is None:
                # No call yet (or the last one ended): the page is still told the state.
                await asyncio.sleep(0.25)
                continue
            sub: Subscriber[CallEvent] = Subscriber(64)
            call.watch(sub)  # the view's expiry ends the whole WebSocket
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
                call.unwatch(sub)
