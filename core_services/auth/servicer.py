"""gRPC edge of authentication: Login for a bearer token, WhoAmI for what it grants."""

from __future__ import annotations

import logging
import math

from core_services.auth.throttle import LoginThrottle, address_key
from core_services.auth.users import MAX_ID_LEN, Authenticator, UserStore
from telehealth.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from telehealth.rpc import Context, token_from
from telehealth.security.tokens import TokenIssuer, TokenVerifier
from telehealth.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger(__name__)


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        authenticator: Authenticator,
        users: UserStore,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        ttl_s: int,
        throttle: LoginThrottle,
    ) -> None:
        self._auth = authenticator
        self._users = users
        self._issuer = issuer
        self._verifier = verifier
        self._ttl_s = ttl_s
        # The HTTP login's throttle: guesses count the same through either door.
        self._throttle = throttle

    async def Login(
        self, request: auth_pb2.LoginRequest, context: Context
    ) -> auth_pb2.LoginResponse:
        if not request.user_id or not request.password:
            raise InvalidArgument("user_id and password must be set")
        address = address_key(context.peer() or "")
        user_key = request.user_id[:MAX_ID_LEN]
        wait = self._throttle.wait_s(address, user_key)
        if wait > 0:
            # Refused before any password hashing: a flood costs the core nothing.
            log.warning("login rate limited", extra={"peer": address, "via": "grpc"})
            raise ResourceExhausted(f"too many sign-in attempts; try again in {math.ceil(wait)} s")
        self._throttle.attempt(address)
        try:
            who = await self._auth.authenticate(request.user_id, request.password)
        except Unauthenticated:
            self._throttle.failed(user_key)
            log.info("login refused", extra={"peer": address, "via": "grpc"})
            raise
        self._throttle.succeeded(user_key)
        token, exp = self._issuer.issue_user(user_id=who.user_id, role=who.role, ttl_s=self._ttl_s)
        # The user id is pseudonymous (a staff number); never the token.
        log.info("login", extra={"user": who.user_id, "role": who.role})
        return auth_pb2.LoginResponse(
            user_id=who.user_id, role=who.role, token=token, token_expires_unix_ns=exp
        )

    async def WhoAmI(
        self, request: auth_pb2.WhoAmIRequest, context: Context
    ) -> auth_pb2.WhoAmIResponse:
        claims = self._verifier.verify_user(token_from(context.invocation_metadata()))
        patients = await self._users.patients_of(claims.user_id)
        return auth_pb2.WhoAmIResponse(
            user_id=claims.user_id,
            role=claims.role,
            token_expires_unix_ns=claims.expires_unix * 1_000_000_000,
            patient_ids=sorted(patients),
        )
