"""Users (clinicians, operators) and their patient assignments; the Authenticator seam for OIDC."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from core_services.auth.passwords import (
    DEFAULT,
    ScryptParams,
    WeakPassword,
    check_password,
    dummy_hash,
    hash_password,
    needs_rehash,
)
from core_services.auth.tables import assignments, users
from telehealth.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

log = logging.getLogger(__name__)

USER_ROLES = ("clinician", "operator")
MAX_ID_LEN = 128
# scrypt checks at once: each takes 16 MiB and a core's CPU for ~0.1 s, so a burst of logins
# queues here instead of exhausting memory (the login throttle bounds the queue).
MAX_CONCURRENT_HASHES = 2
BOOTSTRAP_KEYS = {"user_id", "role", "password", "password_file", "patients"}


@dataclass(frozen=True)
class Identity:
    """An authenticated person: a pseudonymous user id and a role, nothing else."""

    user_id: str
    role: str


class Authenticator(Protocol):
    """Turns credentials into an Identity. The local user store implements it today; an OIDC
    implementation would validate an ID token from the hospital's IdP here instead, mapping its
    `sub` and group claims to user_id and role, and the rest of the core would not change."""

    async def authenticate(self, username: str, password: str) -> Identity: ...


class AssignmentSource(Protocol):
    async def is_assigned(self, user_id: str, patient_id: str) -> bool: ...
    async def patients_of(self, user_id: str) -> set[str]: ...


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_LEN or not value.isprintable() or value.strip() != value:
        raise InvalidArgument(
            f"{name} must be 1-{MAX_ID_LEN} printable characters without surrounding spaces"
        )


class UserStore:
    """Users and assignments in the core's SQL store; implements Authenticator locally."""

    def __init__(self, engine: AsyncEngine, params: ScryptParams = DEFAULT) -> None:
        self._engine = engine
        self.params = params
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self._dummy: str | None = None
        # Hash upgrades done at login (old parameters replaced by the configured ones).
        self.rehashed = 0

    async def _hash(self, password: str) -> str:
        async with self._hashing:
            # scrypt is CPU-bound: off the event loop so hashing does not stall live streams.
            return await asyncio.to_thread(hash_password, password, self.params)

    async def _check(self, password: str, stored: str) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(check_password, password, stored)

    async def add_user(self, user_id: str, role: str, password: str) -> None:
        _check_id("user_id", user_id)
        if role not in USER_ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(USER_ROLES)}")
        try:
            hashed = await self._hash(password)
        except ValueError as e:
            raise InvalidArgument(str(e)) from e
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    users.insert().values(
                        user_id=user_id,
                        role=role,
                        password_hash=hashed,
                        created_unix_ns=time.time_ns(),
                        disabled=False,
                    )
                )
        except IntegrityError as e:
            raise AlreadyExists(f"user {user_id!r} already exists") from e

    async def role_of(self, user_id: str) -> str | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(users.c.role).where(users.c.user_id == user_id, ~users.c.disabled)
                )
            ).first()
        return None if row is None else str(row.role)

    async def assign(self, user_id: str, patient_id: str) -> None:
        _check_id("patient_id", patient_id)
        role = await self.role_of(user_id)
        if role is None:
            raise NotFound(f"no user {user_id!r}")
        if role != "clinician":
            raise InvalidArgument(f"only clinicians are assigned patients; {user_id} is {role}")
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    assignments.insert().values(user_id=user_id, patient_id=patient_id)
                )
        except IntegrityError:
            pass  # already assigned: assigning is idempotent

    async def unassign(self, user_id: str, patient_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(assignments).where(
                    assignments.c.user_id == user_id, assignments.c.patient_id == patient_id
                )
            )

    async def is_assigned(self, user_id: str, patient_id: str) -> bool:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(assignments.c.user_id).where(
                        assignments.c.user_id == user_id, assignments.c.patient_id == patient_id
                    )
                )
            ).first()
        return row is not None

    async def patients_of(self, user_id: str) -> set[str]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(assignments.c.patient_id).where(assignments.c.user_id == user_id)
            )
            return {str(r.patient_id) for r in rows}

    async def authenticate(self, username: str, password: str) -> Identity:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(users.c.role, users.c.password_hash, users.c.disabled).where(
                        users.c.user_id == username[:MAX_ID_LEN]
                    )
                )
            ).first()
        if row is None and self._dummy is None:
            self._dummy = await asyncio.to_thread(dummy_hash, self.params)
        stored = self._dummy if row is None else str(row.password_hash)
        assert stored is not None
        ok = await self._check(password, stored)
        if row is None or not ok or row.disabled:
            raise Unauthenticated("unknown user or wrong password")
        if needs_rehash(stored, self.params):
            await self._rehash(username, password, stored)
        return Identity(username, str(row.role))

    async def _rehash(self, user_id: str, password: str, stored: str) -> None:
        """Replace a hash made with other parameters: the password is at hand only now."""
        try:
            fresh = await self._hash(password)
        except WeakPassword:
            return  # from before the length rule: kept until the user changes it
        async with self._engine.begin() as conn:
            # Only if nobody changed it meanwhile (another replica, a password reset).
            await conn.execute(
                update(users)
                .where(users.c.user_id == user_id, users.c.password_hash == stored)
                .values(password_hash=fresh)
            )
        self.rehashed += 1
        log.info(
            "password hash upgraded to the configured scrypt parameters", extra={"user": user_id}
        )

    async def bootstrap(self, path: Path) -> tuple[int, int]:
        """Create the users listed in a YAML file (a Kubernetes Secret) when missing, and
        assign their patients; existing users keep their passwords. Returns (created,
        assigned). Passwords are hashed and never logged; errors name the entry, not it."""
        try:
            doc = yaml.safe_load(await asyncio.to_thread(path.read_text))
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgument(f"cannot read bootstrap_users_file {path}: {e}") from e
        if doc is None:
            return 0, 0
        if not isinstance(doc, list):
            raise InvalidArgument(f"{path}: must be a YAML list of users")
        created = assigned = 0
        for i, entry in enumerate(doc):
            where = f"{path} entry {i + 1}"
            user_id, role, password, patients = _bootstrap_entry(entry, where, path.parent)
            if await self.role_of(user_id) is None:
                try:
                    await self.add_user(user_id, role, password)
                    created += 1
                except AlreadyExists:
                    pass  # another replica created it at the same moment
                except InvalidArgument as e:
                    raise InvalidArgument(f"{where} ({user_id}): {e.message}") from e
            for patient in patients:
                await self.assign(user_id, patient)
                assigned += 1
        log.info(
            "bootstrap users applied", extra={"users_created": created, "assignments": assigned}
        )
        return created, assigned


def _bootstrap_entry(entry: Any, where: str, base: Path) -> tuple[str, str, str, list[str]]:
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where}: must be a mapping of {sorted(BOOTSTRAP_KEYS)}")
    unknown = sorted(set(entry) - BOOTSTRAP_KEYS)
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown key {unknown[0]!r} (known: {sorted(BOOTSTRAP_KEYS)})"
        )
    user_id, role = entry.get("user_id"), entry.get("role")
    if not isinstance(user_id, str) or not isinstance(role, str):
        raise InvalidArgument(f"{where}: user_id and role must be strings")
    if role not in USER_ROLES:
        raise InvalidArgument(f"{where}: role must be one of {', '.join(USER_ROLES)}")
    password = entry.get("password")
    if "password_file" in entry:
        pf = Path(str(entry["password_file"]))
        try:
            password = (pf if pf.is_absolute() else base / pf).read_text().strip()
        except OSError as e:
            raise InvalidArgument(f"{where}: cannot read password_file: {e.strerror}") from e
    if not isinstance(password, str) or not password:
        raise InvalidArgument(f"{where}: give password or password_file")
    patients = entry.get("patients") or []
    if not isinstance(patients, list) or not all(isinstance(p, str) for p in patients):
        raise InvalidArgument(f"{where}: patients must be a list of patient ids")
    if patients and role != "clinician":
        raise InvalidArgument(f"{where}: only clinicians are assigned patients")
    return user_id, role, password, patients
