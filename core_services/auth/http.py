"""HTTP edge of authentication: login/logout, the session cookie, and the one middleware that
says who is calling every HTTP route of the core (default deny) and refuses cross-site POSTs.

The credential is the same login token the gRPC side takes (`telehealth-ctl login`), checked by
the same verifier: in an HttpOnly SameSite=Strict cookie for browsers, or as
`Authorization: Bearer` for programs. Browsers get one more CSRF guard on top of SameSite: a
state-changing request authenticated by the cookie must carry an Origin header naming this
very host (browsers always send Origin on POST; a cross-site page cannot forge it).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from core_services.auth.throttle import LoginThrottle, address_key
from core_services.auth.users import MAX_ID_LEN, Authenticator
from telehealth.errors import Unauthenticated
from telehealth.security.tokens import TokenIssuer, TokenVerifier, UserClaims

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "telehealth_session"
# The __Host- prefix (https only) pins the cookie to exactly this host: no Domain, Path=/.
SECURE_COOKIE = "__Host-telehealth_session"
MAX_LOGIN_BODY = 4096
OPEN_PATHS = frozenset(
    # /join and /api/v1/join: the patient's invite link, checked by its session token.
    {"/metrics", "/healthz", "/login", "/api/v1/login", "/api/v1/logout", "/join", "/api/v1/join"}
)
OPEN_PREFIXES = ("/static/",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
USER_KEY = web.RequestKey("telehealth.user", UserClaims)
PEER_KEY = web.RequestKey("telehealth.peer", str)


def refusal(status: int, error: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": error, "message": message},
        status=status,
        headers={"Cache-Control": "no-store", **headers},
    )


def caller(request: web.Request) -> UserClaims:
    """The signed-in user of a request the middleware let through."""
    try:
        return request[USER_KEY]
    except KeyError:
        raise RuntimeError("route is not behind the sign-in middleware") from None


def peer(request: web.Request) -> str:
    """Where the request came from, for audit records."""
    return request[PEER_KEY]  # set by the middleware for every request


class HttpAuth:
    def __init__(
        self,
        authenticator: Authenticator,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        *,
        ttl_s: int,
        trust_forwarded: bool,
        throttle: LoginThrottle,
    ) -> None:
        self._auth = authenticator
        self._issuer = issuer
        self._verifier = verifier
        self._ttl_s = ttl_s
        self._trust_forwarded = trust_forwarded
        # Shared with gRPC Login: one budget of guesses whichever door they come through.
        self._throttle = throttle

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/api/v1/login", self.login)
        app.router.add_post("/api/v1/logout", self.logout)
        app.router.add_get("/api/v1/whoami", self.whoami)
        app.router.add_static("/static/login/", STATIC, append_version=False)

    # -- where from ------------------------------------------------------------------------

    def client_address(self, request: web.Request) -> str:
        remote = request.remote or ""
        if self._trust_forwarded:
            # The proxy appends the address it saw; anything left of it the client wrote.
            forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
            if forwarded:
                return forwarded[:64]
        return remote

    def _peer(self, request: web.Request) -> str:
        remote = request.remote or ""
        client = self.client_address(request)
        return f"http:{client}" if client == remote else f"http:{client} via {remote}"

    def is_https(self, request: web.Request) -> bool:
        if request.secure:
            return True
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return self._trust_forwarded and proto == "https"

    # -- the middleware --------------------------------------------------------------------

    def _credential(self, request: web.Request) -> tuple[str | None, bool]:
        """(token, from_cookie)."""
        auth = request.headers.get("Authorization", "")
        if auth:
            scheme, _, value = auth.partition(" ")
            return (value.strip() or None, False) if scheme.lower() == "bearer" else (None, False)
        token = request.cookies.get(SECURE_COOKIE) or request.cookies.get(COOKIE)
        return token, token is not None

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin", "")
        if not origin or origin == "null":
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[PEER_KEY] = self._peer(request)
        path = request.path
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await handler(request)
        token, from_cookie = self._credential(request)
        try:
            request[USER_KEY] = self._verifier.verify_user(token)
        except Unauthenticated as e:
            return self._sign_in_needed(request, e.message, clear=from_cookie)
        if from_cookie and request.method not in SAFE_METHODS and not self._same_origin(request):
            log.warning("cross-site request refused", extra={"path": path[:128]})
            return refusal(
                403,
                "permission_denied",
                "cross-site request refused: a browser POST must come from this site's own pages",
            )
        response = await handler(request)
        if path.startswith(("/api/", "/console/api/")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _sign_in_needed(self, request: web.Request, reason: str, *, clear: bool) -> web.Response:
        api = request.path.startswith(("/api/", "/console/api/"))
        if request.method == "GET" and not api:
            # A page: send the person to sign in, and back here after.
            resp = web.Response(
                status=303, headers={"Location": "/login?next=" + quote(request.path)}
            )
        else:
            resp = refusal(
                401,
                "unauthenticated",
                f"sign in first ({reason}): POST /api/v1/login, or send a login token as "
                "Authorization: Bearer",
                **{"WWW-Authenticate": 'Bearer realm="telehealth"'},
            )
        if clear:
            self._clear_cookie(resp, request)
        return resp

    # -- routes ----------------------------------------------------------------------------

    async def login_page(self, _: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "login.html", headers={"X-Frame-Options": "DENY"})

    async def _login_body(self, request: web.Request) -> tuple[str, str]:
        if request.content_length is not None and request.content_length > MAX_LOGIN_BODY:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_LOGIN_BODY, actual_size=request.content_length
            )
        raw = await request.content.read(MAX_LOGIN_BODY + 1)
        if len(raw) > MAX_LOGIN_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_LOGIN_BODY, actual_size=len(raw))
        try:
            body: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        user = body.get("user") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
            raise ValueError('the body must be JSON {"user": "...", "password": "..."}')
        return user, password

    async def login(self, request: web.Request) -> web.Response:
        # Login CSRF: a browser posting from another site names that site in Origin.
        if "Origin" in request.headers and not self._same_origin(request):
            return refusal(403, "permission_denied", "cross-site login refused")
        try:
            user, password = await self._login_body(request)
        except ValueError as e:
            return refusal(400, "invalid_argument", str(e))
        address = address_key(self.client_address(request))
        user_key = user[:MAX_ID_LEN]
        wait = self._throttle.wait_s(address, user_key)
        if wait > 0:
            log.warning("login rate limited", extra={"peer": address})
            return refusal(
                429,
                "resource_exhausted",
                f"too many sign-in attempts; try again in {math.ceil(wait)} s",
                **{"Retry-After": str(math.ceil(wait))},
            )
        self._throttle.attempt(address)
        try:
            who = await self._auth.authenticate(user, password)
        except Unauthenticated as e:
            self._throttle.failed(user_key)
            log.info("login refused", extra={"peer": address})
            return refusal(401, "unauthenticated", e.message)
        self._throttle.succeeded(user_key)
        token, exp = self._issuer.issue_user(user_id=who.user_id, role=who.role, ttl_s=self._ttl_s)
        log.info("login", extra={"user": who.user_id, "role": who.role, "via": "http"})
        resp = web.json_response(
            {
                "user": who.user_id,
                "role": who.role,
                "token": token,
                "expires_unix_ms": exp // 1_000_000,
            },
            headers={"Cache-Control": "no-store"},
        )
        secure = self.is_https(request)
        resp.set_cookie(
            SECURE_COOKIE if secure else COOKIE,
            token,
            max_age=self._ttl_s,
            path="/",
            secure=secure,
            httponly=True,
            samesite="Strict",
        )
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        _, from_cookie = self._credential(request)
        if from_cookie and not self._same_origin(request):
            return refusal(403, "permission_denied", "cross-site request refused")
        resp = web.json_response({"signed_out": True}, headers={"Cache-Control": "no-store"})
        self._clear_cookie(resp, request)
        return resp

    def _clear_cookie(self, resp: web.StreamResponse, request: web.Request) -> None:
        for name in (COOKIE, SECURE_COOKIE):
            if name in request.cookies:
                resp.del_cookie(name, path="/", secure=name == SECURE_COOKIE, samesite="Strict")

    async def whoami(self, request: web.Request) -> web.Response:
        who = caller(request)
        return web.json_response(
            {"user": who.user_id, "role": who.role, "expires_unix_ms": who.expires_unix * 1000}
        )
