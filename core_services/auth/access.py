"""Who may call what on the core: one interceptor holding every authorization rule, and the audit
records of patient-data reads made through the core. Unknown methods are refused (default deny)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from core_services.auth.throttle import RateLimit, address_key
from core_services.auth.users import AssignmentSource
from telehealth.errors import NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from telehealth.rpc import Context, Handler, token_from
from telehealth.security.audit import AuditEvent
from telehealth.security.identity import PeerIdentity, peer_identity
from telehealth.security.tls import peer_common_name
from telehealth.security.tokens import TokenIssuer, TokenVerifier, UserClaims
from telehealth.v1 import sessions_pb2

log = logging.getLogger(__name__)

ROLE_PUBLISHER = sessions_pb2.ROLE_PUBLISHER
ROLE_VIEWER = sessions_pb2.ROLE_VIEWER
ROLE_OPERATOR = sessions_pb2.ROLE_OPERATOR


class PatientOf(Protocol):
    """Which pseudonymous patient a session belongs to (the session directory)."""

    async def patient_of(self, session_id: str) -> str: ...


class AuditSink(Protocol):
    async def append(self, events: list[AuditEvent]) -> Any: ...


class KnownEdges(Protocol):
    def is_edge(self, edge_id: str) -> bool: ...

    def zone_of(self, edge_id: str) -> str | None: ...


@dataclass(frozen=True)
class Caller:
    """What the interceptor learnt about a call before the servicer runs."""

    user: UserClaims | None
    peer: str
    cn: str


# A ward page polling the same patients counts as one continued view for this long.
VIEW_AUDIT_WINDOW_S = 300.0
# Sessions' patients remembered for archive appends (a session's patient never changes).
PATIENT_CACHE = 100_000
# Certificates that may open a session: the patient's device, or an operator's tools.
OPENERS = ("device", "operator")


class AccessPolicy:
    """The rules; each check raises Unauthenticated / PermissionDenied with a clear message."""

    def __init__(
        self,
        verifier: TokenVerifier,
        issuer: TokenIssuer,
        assignments: AssignmentSource,
        sessions: PatientOf,
        audit: AuditSink,
        edges: KnownEdges,
        *,
        tls: bool,
        refresh_grace_s: int,
        open_limit: RateLimit | None = None,
    ) -> None:
        self.verifier = verifier
        self.issuer = issuer
        self.assignments = assignments
        self.sessions = sessions
        self.audit = audit
        self.edges = edges
        self.tls = tls
        self.refresh_grace_s = refresh_grace_s
        self.open_limit = open_limit
        # (user, action, patient, session) -> when that view was last recorded.
        self._recent_views: dict[tuple[str, str, str, str], int] = {}
        self._patients: dict[str, str] = {}
        if not tls:
            log.warning(
                "plaintext mode: peer identities are NOT checked (any caller may heartbeat or "
                "append archive and audit records as an edge, and open sessions); set "
                "tls_cert_file, tls_key_file and tls_ca_file for mTLS"
            )

    # -- identities -------------------------------------------------------------------------

    def caller(self, context: Context) -> Caller:
        token = token_from(context.invocation_metadata())
        user = None
        if token is not None:
            try:
                user = self.verifier.verify_user(token)
            except Unauthenticated:
                user = None  # maybe a session token; the rule decides
        return Caller(user, context.peer() or "", peer_common_name(context) if self.tls else "")

    def user(self, context: Context, *roles: str) -> UserClaims:
        token = token_from(context.invocation_metadata())
        if token is None:
            raise Unauthenticated(
                "this call needs a login token: run `telehealth-ctl login` (or set TELEHEALTH_TOKEN)"
            )
        claims = self.verifier.verify_user(token)
        if roles and claims.role not in roles:
            raise PermissionDenied(f"{claims.role}s may not do this (needs {' or '.join(roles)})")
        return claims

    def publisher(self, context: Context, session_id: str) -> None:
        """The device of this session: it holds the session's publisher token (expired tokens are
        accepted for refresh within the grace period, so a device back from a long outage can
        resume)."""
        self.verifier.verify(
            token_from(context.invocation_metadata()),
            session_id=session_id,
            roles=("publisher",),
            expired_grace_s=self.refresh_grace_s,
        )

    def identity(self, context: Context) -> PeerIdentity:
        """The role URI of the caller's certificate (telehealth.security.identity)."""
        return peer_identity(context)

    def edge(self, context: Context, edge_id: str, claimed_zone: str | None = None) -> None:
        """An edge node. With mTLS its certificate's role URI must name this edge id, or the
        zone it serves (claimed_zone on the first heartbeat, else the zone it registered
        with). In plaintext dev mode there is no peer identity, so only a registered edge id
        is required (startup says so)."""
        if not self.tls:
            if claimed_zone is None and not self.edges.is_edge(edge_id):
                raise PermissionDenied(f"{edge_id[:128]!r} is not a registered edge")
            return
        who = self.identity(context)
        if who.kind == "edge" and who.name == edge_id:
            return
        if who.kind == "zone":
            registered = self.edges.zone_of(edge_id)
            zone = claimed_zone if claimed_zone is not None else registered
            if zone == who.name and (registered is None or registered == who.name):
                return
            raise PermissionDenied(
                f"client certificate {who.describe()} serves zone {who.name!r}; edge "
                f"{edge_id[:128]!r} is {'not registered' if zone is None else 'in another zone'}"
            )
        raise PermissionDenied(
            f"client certificate {who.describe()} may not act as edge {edge_id[:128]!r} "
            "(needs spiffe://telehealth/edge/<edge_id> or .../zone/<zone>)"
        )

    def opener(self, context: Context) -> None:
        """Sessions.Open: with mTLS only a device or operator certificate may open one; from
        any one address at most open_rate_per_address_per_s (after a burst)."""
        if self.tls:
            who = self.identity(context)
            if who.kind not in OPENERS:
                raise PermissionDenied(
                    f"client certificate {who.describe()} may not open sessions (needs a "
                    "device or operator certificate: spiffe://telehealth/device or .../operator)"
                )
        if self.open_limit is not None:
            wait = self.open_limit.take(address_key(context.peer() or ""))
            if wait > 0:
                raise ResourceExhausted(
                    f"too many sessions opened from this address; try again in {wait:.1f} s"
                )

    async def patient_cached(self, session_id: str) -> str:
        """The session's patient (never changes), remembered for the archive's hot path."""
        hit = self._patients.get(session_id)
        if hit is not None:
            return hit
        patient = await self.patient(session_id)
        if len(self._patients) >= PATIENT_CACHE:
            self._patients.clear()
        self._patients[session_id] = patient
        return patient

    async def archive_batches(self, req: Any, edge_id: str) -> None:
        """Rows an edge archives must be its own and labelled with the session's patient:
        an edge must never write vitals under another patient or another edge's name."""
        if req.edge_id != edge_id:
            raise PermissionDenied(
                f"archive stream of edge {edge_id[:128]!r} cannot append for {req.edge_id[:128]!r}"
            )
        for b in req.batches:
            if b.edge_id and b.edge_id != edge_id:
                raise PermissionDenied(
                    f"edge {edge_id[:128]!r} cannot archive batches labelled edge "
                    f"{b.edge_id[:128]!r}"
                )
            if not b.session_id or (b.rejected and not b.patient_id):
                continue  # the servicer refuses a missing session; tombstones carry no vitals
            if b.patient_id != await self.patient_cached(b.session_id):
                raise PermissionDenied(
                    f"batch seq {b.batch.seq} names a patient other than session "
                    f"{b.session_id[:64]}'s; nothing of this request was stored"
                )

    async def clinician_for(
        self, context: Context, patient_id: str, action: str, session_id: str = ""
    ) -> UserClaims:
        """A clinician assigned to this patient; every attempt is audited, refusals too."""
        claims = self.user(context, "clinician", "operator")
        return await self.clinician_at(claims, context.peer() or "", patient_id, action, session_id)

    async def clinician_at(
        self, claims: UserClaims, peer: str, patient_id: str, action: str, session_id: str = ""
    ) -> UserClaims:
        """clinician_for() for a caller already identified another way (the HTTP side)."""
        if claims.role not in ("clinician", "operator"):
            raise PermissionDenied(f"{claims.role}s may not do this (needs clinician)")
        allowed = claims.role == "clinician" and await self.assignments.is_assigned(
            claims.user_id, patient_id
        )
        await self.record_at(peer, claims, action, patient_id, session_id, allowed)
        if claims.role == "operator":
            raise PermissionDenied("operators see edges and sessions, never vitals")
        if not allowed:
            raise PermissionDenied(
                f"the patient of session {session_id} is not assigned to you"
                if session_id
                else "this patient is not assigned to you"
            )
        return claims

    async def record(
        self,
        context: Context,
        who: UserClaims,
        action: str,
        patient_id: str,
        session_id: str,
        allowed: bool,
    ) -> None:
        await self.record_at(context.peer() or "", who, action, patient_id, session_id, allowed)

    async def record_at(
        self,
        peer: str,
        who: UserClaims,
        action: str,
        patient_id: str,
        session_id: str,
        allowed: bool,
    ) -> None:
        await self.audit.append(
            [
                AuditEvent(
                    at_unix_ns=time.time_ns(),
                    subject=who.user_id,
                    role=who.role,
                    action=action,
                    patient_id=patient_id,
                    session_id=session_id,
                    peer=peer,
                    source="core",
                    outcome="allowed" if allowed else "denied",
                )
            ]
        )

    async def record_views(
        self, peer: str, who: UserClaims, action: str, shown: list[tuple[str, str]]
    ) -> None:
        """One allowed read of several patients (a ward listing): an entry per (patient,
        session) shown, appended together. A ward page polls every few seconds: the same
        viewer seeing the same patient again within VIEW_AUDIT_WINDOW_S is one continued
        view, recorded once per window rather than thousands of times an hour."""
        now = time.time_ns()
        window = int(VIEW_AUDIT_WINDOW_S * 1e9)
        recent = self._recent_views
        if len(recent) > 50_000:
            for k in [k for k, t in recent.items() if now - t >= window]:
                del recent[k]
        fresh = []
        for patient_id, session_id in shown:
            key = (who.user_id, action, patient_id, session_id)
            if now - recent.get(key, 0) < window:
                continue
            recent[key] = now
            fresh.append(
                AuditEvent(
                    at_unix_ns=now,
                    subject=who.user_id,
                    role=who.role,
                    action=action,
                    patient_id=patient_id,
                    session_id=session_id,
                    peer=peer,
                    source="core",
                )
            )
        if fresh:
            await self.audit.append(fresh)

    async def patient(self, session_id: str) -> str:
        return await self.sessions.patient_of(session_id)


Rule = Callable[[AccessPolicy, Any, Context], Awaitable[Callable[[Any], Awaitable[Any]] | None]]


async def _open(p: AccessPolicy, req: Any, ctx: Context) -> None:
    return None


async def _open_session(p: AccessPolicy, req: Any, ctx: Context) -> None:
    p.opener(ctx)
    return None


async def _operator(p: AccessPolicy, req: Any, ctx: Context) -> None:
    p.user(ctx, "operator")
    return None


async def _any_user(p: AccessPolicy, req: Any, ctx: Context) -> None:
    p.user(ctx)
    return None


async def _attach(
    p: AccessPolicy, req: Any, ctx: Context
) -> Callable[[Any], Awaitable[Any]] | None:
    if req.role == ROLE_PUBLISHER:
        p.publisher(ctx, req.session_id)
        return None
    if req.role == ROLE_OPERATOR:
        p.user(ctx, "operator")
        return None
    if req.role != ROLE_VIEWER:
        return None  # the servicer names the valid roles
    try:
        patient = await p.patient(req.session_id)
    except NotFound:
        p.user(ctx)  # unknown session: still no answer without a login
        raise
    who = await p.clinician_for(ctx, patient, "session.attach_viewer", req.session_id)

    async def with_subject(resp: Any) -> Any:
        # The viewer token names the clinician, so the edge's audit records say who read.
        s = resp.session
        token, exp = p.issuer.issue(
            session_id=s.session_id,
            role="viewer",
            edge_id=resp.assignment.edge_id,
            zone=s.zone,
            spo2_scale=int(s.spo2_scale) or 1,
            subject_id=who.user_id,
        )
        resp.assignment.token = token
        resp.assignment.token_expires_unix_ns = exp
        return resp

    return with_subject


async def _publisher_or_operator(p: AccessPolicy, req: Any, ctx: Context) -> None:
    c = p.caller(ctx)
    if c.user is not None:
        if c.user.role != "operator":
            raise PermissionDenied("only the session's device or an operator may do this")
        return None
    p.publisher(ctx, req.session_id)
    return None


async def _publisher(p: AccessPolicy, req: Any, ctx: Context) -> None:
    p.publisher(ctx, req.session_id)
    return None


def _blank_clinical(s: Any) -> None:
    # Operators run the mesh; NEWS2 is clinical data they have no need to see.
    s.news2_total = 0
    s.news2_band = 0
    s.news2_unix_ns = 0


async def _list(p: AccessPolicy, req: Any, ctx: Context) -> Callable[[Any], Awaitable[Any]]:
    who = p.user(ctx)
    mine = await p.assignments.patients_of(who.user_id) if who.role == "clinician" else set()

    async def filtered(resp: Any) -> Any:
        keep = [s for s in resp.sessions if who.role == "operator" or s.patient_id in mine]
        for s in keep:
            if who.role == "operator":
                _blank_clinical(s)
        del resp.sessions[:]
        resp.sessions.extend(keep)
        if who.role == "clinician":
            # A listing shows NEWS2 per patient: one entry per patient shown (coalesced).
            await p.record_views(
                ctx.peer() or "",
                who,
                "sessions.list",
                [(s.patient_id, s.session_id) for s in keep],
            )
        return resp

    return filtered


async def _query(p: AccessPolicy, req: Any, ctx: Context) -> None:
    patient = req.patient_id or await p.patient(req.session_id)
    await p.clinician_for(ctx, patient, "archive.query", req.session_id)
    return None


async def _export(p: AccessPolicy, req: Any, ctx: Context) -> None:
    await p.clinician_for(ctx, req.patient_id, "archive.export")
    return None


async def _audit_append(p: AccessPolicy, req: Any, ctx: Context) -> None:
    p.edge(ctx, req.edge_id)
    return None


UNARY_RULES: dict[str, Rule] = {
    "/telehealth.v1.SessionsService/Open": _open_session,
    "/telehealth.v1.SessionsService/Attach": _attach,
    "/telehealth.v1.SessionsService/Close": _publisher_or_operator,
    "/telehealth.v1.SessionsService/ChangeZone": _publisher,
    "/telehealth.v1.SessionsService/List": _list,
    "/telehealth.v1.EdgesService/ListEdges": _operator,
    "/telehealth.v1.EdgesService/Drain": _operator,
    "/telehealth.v1.AuthService/Login": _open,
    "/telehealth.v1.AuthService/WhoAmI": _any_user,
    "/telehealth.v1.AuditService/Append": _audit_append,
    "/telehealth.v1.ArchiveService/QueryVitals": _query,
    "/telehealth.v1.ArchiveService/ExportFhir": _export,
    # Only a number (how far the archive got), no patient data: any mTLS peer may ask.
    "/telehealth.v1.ArchiveService/GetWatermark": _open,
}
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Applies AccessPolicy before each handler; DomainErrors become statuses in the outer
    interceptor (telehealth.rpc), so refusals are reported like any other error."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        p = self.policy
        rule = UNARY_RULES.get(method)
        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                if rule is None:
                    raise PermissionDenied(f"{method} is not open to callers")
                after = await rule(p, request, context)
                resp = await inner_uu(request, context)
                return resp if after is None else await after(resp)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and method == "/telehealth.v1.SessionsService/Watch":
            inner_us: Any = handler.unary_stream

            async def watch(request: Any, context: Context) -> AsyncIterator[Any]:
                who = p.caller(context).user
                if who is None:
                    if request.session_id:
                        # A device following its own session (where to publish after a move).
                        p.publisher(context, request.session_id)
                    else:
                        p.user(context)  # raises, saying a login is needed
                mine = (
                    await p.assignments.patients_of(who.user_id)
                    if who is not None and who.role == "clinician"
                    else set()
                )
                if who is not None and who.role == "clinician":
                    await p.record(context, who, "sessions.watch", "", request.session_id, True)
                async for ev in inner_us(request, context):
                    if who is not None:
                        if who.role == "clinician":
                            if ev.session.patient_id not in mine:
                                continue
                            # Each patient the watch shows, once per audit window.
                            await p.record_views(
                                context.peer() or "",
                                who,
                                "sessions.watch",
                                [(ev.session.patient_id, ev.session.session_id)],
                            )
                        if who.role == "operator":
                            _blank_clinical(ev.session)
                    yield ev

            return grpc.unary_stream_rpc_method_handler(
                watch,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and method in (
            "/telehealth.v1.EdgesService/Heartbeat",
            "/telehealth.v1.ArchiveService/Append",
        ):
            inner_ss: Any = handler.stream_stream

            archive = method == "/telehealth.v1.ArchiveService/Append"

            async def from_edge(request_iterator: Any, context: Context) -> AsyncIterator[Any]:
                async def checked() -> AsyncIterator[Any]:
                    edge_id: str | None = None
                    async for req in request_iterator:
                        if edge_id is None:
                            if p.tls:
                                # A heartbeat registers the edge, so its zone is the claimed
                                # one; later messages are held to this id (servicer, below).
                                p.edge(context, req.edge_id, None if archive else req.zone)
                            edge_id = req.edge_id
                        if archive:
                            # Checked whole before the servicer sees it: a bad batch stores
                            # nothing of its request.
                            await p.archive_batches(req, edge_id)
                        yield req

                async for resp in inner_ss(checked(), context):
                    yield resp

            return grpc.stream_stream_rpc_method_handler(
                from_edge,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None and rule is not None:
            inner_ruled: Any = handler.unary_stream
            checked_rule = rule

            async def ruled_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                # Rules of streaming methods decide up front; none filters responses.
                if await checked_rule(p, request, context) is not None:
                    raise PermissionDenied(f"{method} has a rule that streams cannot apply")
                async for resp in inner_ruled(request, context):
                    yield resp

            return grpc.unary_stream_rpc_method_handler(
                ruled_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        log.warning("refusing a method with no access rule", extra={"method": method})
        if handler.unary_stream is not None:

            async def refuse_us(request: Any, context: Context) -> AsyncIterator[Any]:
                raise PermissionDenied(f"{method} is not open to callers")
                yield

            return grpc.unary_stream_rpc_method_handler(
                refuse_us,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            lambda it, ctx: refuse_stream(method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def refuse_stream(method: str) -> AsyncIterator[Any]:
    raise PermissionDenied(f"{method} is not open to callers")
    yield
