"""gRPC edge of authentication: Login for a bearer token, WhoAmI for what it grants."""

from __future__ import annotations

import logging

from core_services.auth.users import Authenticator, UserStore
from telehealth.errors import InvalidArgument
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
    ) -> None:
        self._auth = authenticator
        self._users = users
        self._issuer = issuer
        self._verifier = verifier
        self._ttl_s = ttl_s

    async def Login(
        self, request: auth_pb2.LoginRequest, context: Context
    ) -> auth_pb2.LoginResponse:
        if not request.user_id or not request.password:
            raise InvalidArgument("user_id and password must be set")
        who = await self._auth.authenticate(request.user_id, request.password)
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
