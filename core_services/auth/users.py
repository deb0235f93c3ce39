"""Users (clinicians, operators) and their patient assignments; the Authenticator seam for OIDC."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from core_services.auth.passwords import DUMMY_HASH, check_password, hash_password
from core_services.auth.tables import assignments, users
from telehealth.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

USER_ROLES = ("clinician", "operator")
MAX_ID_LEN = 128


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

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add_user(self, user_id: str, role: str, password: str) -> None:
        _check_id("user_id", user_id)
        if role not in USER_ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(USER_ROLES)}")
        try:
            hashed = hash_password(password)
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
        stored = DUMMY_HASH if row is None else str(row.password_hash)
        # scrypt is CPU-bound: off the event loop so logins do not stall live streams.
        ok = await asyncio.to_thread(check_password, password, stored)
        if row is None or not ok or row.disabled:
            raise Unauthenticated("unknown user or wrong password")
        return Identity(username, str(row.role))
