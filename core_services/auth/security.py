"""The core's security wiring in one object: users, access rules, audit log, key rotation."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from core_services.audit.anchor import CheckpointFile
from core_services.audit.servicer import AuditServicer
from core_services.audit.store import SqlAuditLog
from core_services.auth.access import AccessInterceptor, AccessPolicy
from core_services.auth.http import HttpAuth
from core_services.auth.passwords import ScryptParams
from core_services.auth.servicer import AuthServicer
from core_services.auth.throttle import LoginLimits, LoginThrottle, RateLimit
from core_services.auth.users import UserStore
from core_services.edges.registry import EdgeRegistry
from core_services.sessions.directory import SessionDirectory
from core_services.store import SqlStore
from telehealth.config import ConfigError, CoreSettings
from telehealth.errors import DomainError
from telehealth.rpc import GrpcServer
from telehealth.security.audit import AuditKey
from telehealth.security.tokens import KeyRing, TokenIssuer, TokenVerifier
from telehealth.v1 import audit_pb2_grpc, auth_pb2_grpc

log = logging.getLogger(__name__)

# How often keys_dir is looked at for keys added by other replicas or a Secret update.
KEY_POLL_S = 2.0


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
        self.users = UserStore(
            store.engine, ScryptParams(n=settings.password_scrypt_n, p=settings.password_scrypt_p)
        )
        # One budget of sign-in guesses for HTTP and gRPC alike.
        self.throttle = LoginThrottle(
            LoginLimits(
                max_failures_per_user=settings.login_max_failures_per_user,
                failure_window_s=settings.login_failure_window_s,
                max_attempts_per_address=settings.login_max_attempts_per_address,
            )
        )
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
            open_limit=RateLimit(
                settings.open_rate_per_address_per_s, settings.open_burst_per_address
            ),
        )
        self.interceptor = AccessInterceptor(self.policy)
        self._auth = AuthServicer(
            self.users, self.users, issuer, self.verifier, settings.user_token_ttl_s, self.throttle
        )
        self._audit = AuditServicer(self.audit, sessions.patient_of)
        self.http = HttpAuth(
            self.users,
            issuer,
            self.verifier,
            ttl_s=settings.user_token_ttl_s,
            trust_forwarded=settings.http_trust_forwarded,
            throttle=self.throttle,
        )

    async def start(self) -> None:
        """What needs the store: the bootstrap users (Kubernetes Secret) are created now, so
        a bad file stops the core at start with a message naming it."""
        if not self.users.params.meets_owasp():
            log.warning(
                "password hashing is weaker than OWASP's scrypt guidance (tests only)",
                extra={"n": self.users.params.n, "p": self.users.params.p},
            )
        path = self.settings.bootstrap_users_file
        if path is not None:
            try:
                await self.users.bootstrap(path)
            except DomainError as e:
                raise ConfigError(f"setting 'bootstrap_users_file': {e.message}") from e

    def register(self, grpc_server: GrpcServer) -> None:
        grpc_server.add(
            auth_pb2_grpc.add_AuthServiceServicer_to_server, self._auth, "telehealth.v1.AuthService"
        )
        grpc_server.add(
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            self._audit,
            "telehealth.v1.AuditService",
        )

    def rotate_keys(self, push: Any = None) -> str | None:
        """A new signing key, written where the ring loads and other replicas look
        (keys_dir); keys whose tokens (and refresh grace) have all expired retire. Edges get
        the new public keys at once over their heartbeat streams. A read-only keys_dir (a
        Kubernetes Secret) is managed from outside: nothing is rotated here then."""
        directory = self.settings.resolved_keys_dir()
        if not os.access(directory, os.W_OK):
            log.warning(
                "keys_dir is read-only: token keys are rotated by updating it (e.g. the "
                "Secret), not by the core",
                extra={"keys_dir": str(directory)},
            )
            return None
        kid = self.keys.rotate()
        self.keys.save(directory)
        s = self.settings
        cutoff = time.time() - (s.token_ttl_s + s.token_refresh_grace_s + s.user_token_ttl_s)
        retired = self.keys.retire_older_than(cutoff, directory)
        self.verifier.replace_keys(self.keys.public_keys())
        if push is not None:
            push()
        log.info("token signing key rotated", extra={"kid": kid, "retired": retired})
        return kid

    def reload_keys(self, push: Any = None) -> bool:
        """Take in keys that appeared in keys_dir: written by another replica's rotation or
        by a Kubernetes Secret update (the newest signs from now on)."""
        try:
            added = self.keys.merge_from(self.settings.resolved_keys_dir())
        except (OSError, ValueError):
            log.exception(
                "cannot read keys_dir", extra={"keys_dir": str(self.settings.resolved_keys_dir())}
            )
            return False
        if added:
            self.verifier.replace_keys(self.keys.public_keys())
            if push is not None:
                push()
            log.info(
                "token keys reloaded from keys_dir", extra={"signing_kid": self.keys.current_kid}
            )
        return added

    async def run_rotation(self, stop: asyncio.Event, push: Any = None) -> None:
        """Rotate every token_key_rotation_s, and look at keys_dir every KEY_POLL_S."""
        next_rotation = time.monotonic() + self.settings.token_key_rotation_s
        while not stop.is_set():
            wait = min(KEY_POLL_S, max(0.0, next_rotation - time.monotonic()))
            try:
                await asyncio.wait_for(stop.wait(), wait)
                return
            except TimeoutError:
                pass
            self.reload_keys(push)
            if time.monotonic() >= next_rotation:
                self.rotate_keys(push)
                next_rotation = time.monotonic() + self.settings.token_key_rotation_s
