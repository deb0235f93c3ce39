"""The core's security wiring in one object: users, access rules, audit log, key rotation."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from core_services.audit.anchor import CheckpointFile
from core_services.audit.servicer import AuditServicer
from core_services.audit.store import SqlAuditLog
from core_services.auth.access import AccessInterceptor, AccessPolicy
from core_services.auth.http import HttpAuth, LoginLimits
from core_services.auth.servicer import AuthServicer
from core_services.auth.users import UserStore
from core_services.edges.registry import EdgeRegistry
from core_services.sessions.directory import SessionDirectory
from core_services.store import SqlStore
from telehealth.config import ConfigError, CoreSettings
from telehealth.rpc import GrpcServer
from telehealth.security.audit import AuditKey
from telehealth.security.tokens import KeyRing, TokenIssuer, TokenVerifier
from telehealth.v1 import audit_pb2_grpc, auth_pb2_grpc

log = logging.getLogger(__name__)


class _Sessions:
    def __init__(self, directory: SessionDirectory) -> None:
        self._d = directory

    async def patient_of(self, session_id: str) -> str:
        return (await self._d.get(session_id)).patient_id


class _Edges:
    def __init__(self, registry: EdgeRegistry) -> None:
        self._r = registry

    def is_edge(self, edge_id: str) -> bool:
        return edge_id in self._r.edges

    def zone_of(self, edge_id: str) -> str | None:
        e = self._r.edges.get(edge_id)
        return None if e is None else e.zone


def audit_key(settings: CoreSettings) -> AuditKey:
    path = settings.resolved_audit_key_file()
    try:
        return AuditKey.load_or_create(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"setting 'audit_key_file': cannot load or create the audit key {path}: {e}"
        ) from e


class CoreSecurity:
    def __init__(
        self,
        settings: CoreSettings,
        store: SqlStore,
        keys: KeyRing,
        issuer: TokenIssuer,
        directory: SessionDirectory,
        registry: EdgeRegistry,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.registry = registry
        self.users = UserStore(store.engine)
        self.audit = SqlAuditLog(
            store.engine,
            audit_key(settings),
            CheckpointFile(settings.resolved_audit_checkpoint_file()),
        )
        self.verifier = TokenVerifier(ring=keys)
        sessions = _Sessions(directory)
        self.policy = AccessPolicy(
            self.verifier,
            issuer,
            self.users,
            sessions,
            self.audit,
            _Edges(registry),
            tls=settings.tls() is not None,
            refresh_grace_s=settings.token_refresh_grace_s,
        )
        self.interceptor = AccessInterceptor(self.policy)
        self._auth = AuthServicer(
            self.users, self.users, issuer, self.verifier, settings.user_token_ttl_s
        )
        self._audit = AuditServicer(self.audit, sessions.patient_of)
        self.http = HttpAuth(
            self.users,
            issuer,
            self.verifier,
            ttl_s=settings.user_token_ttl_s,
            trust_forwarded=settings.http_trust_forwarded,
            limits=LoginLimits(
                max_failures_per_user=settings.login_max_failures_per_user,
                failure_window_s=settings.login_failure_window_s,
                max_attempts_per_address=settings.login_max_attempts_per_address,
            ),
        )

    def register(self, grpc_server: GrpcServer) -> None:
        grpc_server.add(
            auth_pb2_grpc.add_AuthServiceServicer_to_server, self._auth, "telehealth.v1.AuthService"
        )
        grpc_server.add(
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            self._audit,
            "telehealth.v1.AuditService",
        )

    def rotate_keys(self, push: Any = None) -> str:
        """A new signing key; keys whose tokens (and refresh grace) have all expired retire.
        Edges get the new public keys at once over their heartbeat streams."""
        kid = self.keys.rotate()
        directory = self.settings.data_dir / "keys"
        self.keys.save(directory)
        s = self.settings
        cutoff = time.time() - (s.token_ttl_s + s.token_refresh_grace_s + s.user_token_ttl_s)
        retired = self.keys.retire_older_than(cutoff, directory)
        self.verifier.replace_keys(self.keys.public_keys())
        if push is not None:
            push()
        log.info("token signing key rotated", extra={"kid": kid, "retired": retired})
        return kid

    async def run_rotation(self, stop: asyncio.Event, push: Any = None) -> None:
        period = self.settings.token_key_rotation_s
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), period)
            except TimeoutError:
                self.rotate_keys(push)
