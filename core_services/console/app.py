"""Console routes: static pages plus a small JSON API over the core's session directory.

Every route sits behind the sign-in middleware (core_services.auth.http); a clinician sees and
opens only the patients assigned to them, operators get no vitals, and every view of patient
data is written to the audit log through the AccessPolicy the gRPC side uses."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from core_services.auth.access import AccessPolicy
from core_services.auth.http import caller, peer
from core_services.edges.registry import EdgeRegistry
from core_services.sessions.directory import SessionDirectory
from core_services.sessions.domain import LiveReport, Session, SessionState
from telehealth.errors import (
    HTTP_STATUS,
    DomainError,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from telehealth.security.tokens import UserClaims

STATIC = Path(__file__).parent / "static"
# /api/v1/join answers the patient page from an edge's origin; the token is in the body.
CORS = {"Access-Control-Allow-Origin": "*"}


class Console:
    def __init__(
        self, directory: SessionDirectory, edges: EdgeRegistry, policy: AccessPolicy
    ) -> None:
        self._directory = directory
        self._edges = edges
        self._policy = policy

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/console", self.page)
        app.router.add_get("/console/api/ward", self.ward)
        app.router.add_post("/console/api/sessions/{session_id}/attach", self.attach)
        app.router.add_post("/console/api/sessions/{session_id}/invite", self.invite)
        # The patient's way in (open paths: the session token is the credential).
        app.router.add_get("/join", self.join_page)
        app.router.add_post("/api/v1/join", self.join)
        app.router.add_static("/static/console/", STATIC, append_version=False)

    async def page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(
            STATIC / "console.html",
            headers={"X-Frame-Options": "DENY", "Cache-Control": "no-store"},
        )

    def _edge_http(self, s: Session) -> str:
        e = self._edges.edges.get(s.edge_id)
        return e.http_address if e is not None else ""

    def _row(self, s: Session, live: LiveReport) -> dict[str, Any]:
        now = time.time_ns()
        return {
            "session_id": s.session_id,
            "patient_id": s.patient_id,
            "zone": s.zone,
            "edge_id": s.edge_id,
            "edge_http": self._edge_http(s),
            "news2_total": live.news2_total,
            "news2_band": live.news2_band,
            "news2_age_s": (now - live.news2_unix_ns) / 1e9 if live.news2_unix_ns else None,
            "placements": s.placements,
            "opened_unix_ms": s.opened_unix_ns // 1_000_000,
        }

    async def ward(self, request: web.Request) -> web.Response:
        """The signed-in clinician's open sessions, and nobody else's."""
        who = caller(request)
        if who.role != "clinician":
            return _error(
                PermissionDenied(
                    f"{who.role}s see edges and metrics, never vitals: the ward is for clinicians"
                )
            )
        mine = await self._policy.assignments.patients_of(who.user_id)
        shown = [
            s
            for s in sorted(self._directory.sessions.values(), key=lambda s: s.opened_unix_ns)
            if s.state is SessionState.OPEN and s.patient_id in mine
        ]
        await self._policy.record_views(
            peer(request), who, "console.ward", [(s.patient_id, s.session_id) for s in shown]
        )
        rows = [self._row(s, self._directory.live.get(s.session_id, LiveReport())) for s in shown]
        return web.json_response(
            {"clinician": {"id": who.user_id, "role": who.role}, "sessions": rows}
        )

    async def _assign(self, request: web.Request, role: str, action: str) -> dict[str, Any]:
        sid = request.match_info["session_id"]
        who = caller(request)
        patient_id = (await self._directory.get(sid)).patient_id  # NotFound names the id
        # Audited before any token is made, refusals too (someone else's patient, operators).
        await self._policy.clinician_at(who, peer(request), patient_id, action, sid)
        s, a = await self._directory.attach(sid, role)
        token, expires_unix_ns = a.token, a.expires_unix_ns
        if role == "viewer":
            token, expires_unix_ns = self._viewer_token(s, a.edge_id, who)
        return {
            "session_id": sid,
            "edge_id": a.edge_id,
            "edge_http": self._edge_http(s),
            "token": token,
            "expires_unix_ms": expires_unix_ns // 1_000_000,
            "role": role,
        }

    def _viewer_token(self, s: Session, edge_id: str, who: UserClaims) -> tuple[str, int]:
        # The viewer token names the clinician, so the edge's audit records say who read.
        return self._policy.issuer.issue(
            session_id=s.session_id,
            role="viewer",
            edge_id=edge_id,
            zone=s.zone,
            spo2_scale=int(s.spo2_scale) or 1,
            subject_id=who.user_id,
        )

    async def attach(self, request: web.Request) -> web.Response:
        """A viewer token and the edge to use it at, for the patient view."""
        try:
            return web.json_response(await self._assign(request, "viewer", "console.attach"))
        except DomainError as e:
            return _error(e)

    async def invite(self, request: web.Request) -> web.Response:
        """The patient's invite link: the core's /join page with a publisher token.

        The link names the core, not an edge: /join asks where the session lives now and
        sends the patient's browser on to that edge's patient page, so a link still works
        after the session moved, and the page itself comes back through /join to rejoin
        after a move. The token travels in the URL fragment, which browsers never send to
        servers, so it does not end up in access logs.
        """
        try:
            a = await self._assign(request, "publisher", "console.invite")
        except DomainError as e:
            return _error(e)
        link = f"{_origin(request)}/join#session={a['session_id']}&token={a['token']}"
        return web.json_response({"link": link, "expires_unix_ms": a["expires_unix_ms"]})

    async def join_page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(
            STATIC / "join.html",
            headers={"X-Frame-Options": "DENY", "Cache-Control": "no-store"},
        )

    async def join(self, request: web.Request) -> web.Response:
        """POST {"session_id", "token"} (the patient's current publisher token) -> where the
        session lives now and a fresh publisher token for it, as the patient page's link.

        The body may come as text/plain, so the patient page (on an edge's origin) can renew
        its token here without a CORS preflight; no cookie is involved, so any origin may.
        """
        try:
            try:
                body = json.loads(await request.text() or "{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidArgument(f"body must be JSON: {e}") from None
            if not isinstance(body, dict) or not isinstance(body.get("session_id"), str):
                raise InvalidArgument('body needs "session_id" and "token" as strings')
            sid = body["session_id"]
            token = body.get("token")
            claims = self._policy.verifier.verify(
                token if isinstance(token, str) else None, session_id=sid, roles=("publisher",)
            )
            s, a = await self._directory.attach(claims.session_id, "publisher")
        except DomainError as e:
            return _error(e, CORS)
        edge_http = self._edge_http(s)
        if not edge_http:
            return _error(
                Unavailable(f"session {sid} has no reachable edge right now; try again"), CORS
            )
        link = f"{edge_http}/patient#session={sid}&token={a.token}&join={_origin(request)}/join"
        return web.json_response(
            {
                "session_id": sid,
                "edge_id": a.edge_id,
                "edge_http": edge_http,
                "token": a.token,
                "expires_unix_ms": a.expires_unix_ns // 1_000_000,
                "link": link,
            },
            headers=CORS,
        )


def _origin(request: web.Request) -> str:
    """Where browsers reach this core: the page's own origin when the browser says it (the
    console's fetch does; behind a proxy it is the public one), else this request's."""
    origin = request.headers.get("Origin", "")
    if origin.startswith(("http://", "https://")):
        return origin.rstrip("/")
    return str(request.url.origin())


def _error(e: DomainError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": e.code.value, "message": e.message},
        status=HTTP_STATUS.get(e.code, 400),
        headers=headers,
    )
