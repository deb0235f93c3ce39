"""Session tokens: short-lived EdDSA JWTs issued by the core and verified offline at the edge."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from telehealth.errors import PermissionDenied, Unauthenticated

ISSUER = "telehealth-core"
AUDIENCE = "telehealth-mesh"
ROLES = ("publisher", "viewer", "operator")
# Tokens naming a person (clinician or operator) after login; a different audience, so a
# person's token is never accepted where a session token is expected, nor the other way.
USER_AUDIENCE = "telehealth-user"
USER_ROLES = ("clinician", "operator")
# Tolerated clock difference between core and edge.
LEEWAY_S = 5


@dataclass(frozen=True)
class SessionClaims:
    session_id: str
    role: str
    edge_id: str
    zone: str
    spo2_scale: int
    expires_unix: int
    subject_id: str


@dataclass(frozen=True)
class UserClaims:
    user_id: str
    role: str
    expires_unix: int


class KeyRing:
    """Ed25519 signing keys by kid; the newest signs, all verify (rotation without a gap)."""

    def __init__(self, keys: dict[str, Ed25519PrivateKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PrivateKey] = dict(keys or {})
        # When each key started signing, so old ones can retire once their tokens expired.
        self.created: dict[str, float] = {kid: time.time() for kid in self._keys}
        if not self._keys:
            self.rotate()

    @property
    def current_kid(self) -> str:
        return next(reversed(self._keys))

    def rotate(self) -> str:
        kid = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self._keys[kid] = Ed25519PrivateKey.generate()
        self.created[kid] = time.time()
        return kid

    def retire_older_than(self, cutoff_unix: float, directory: Path | None = None) -> list[str]:
        """Drop verifying keys that stopped signing before cutoff (never the current one)."""
        current = self.current_kid
        gone = []
        kids = list(self._keys)
        for i, kid in enumerate(kids):
            # A key stopped signing when its successor started.
            stopped = self.created.get(kids[i + 1], 0.0) if i + 1 < len(kids) else None
            if kid != current and stopped is not None and stopped < cutoff_unix:
                self._keys.pop(kid)
                self.created.pop(kid, None)
                gone.append(kid)
                if directory is not None:
                    (directory / f"{kid}.pem").unlink(missing_ok=True)
        return gone

    def retire(self, kid: str) -> None:
        if kid == self.current_kid:
            raise ValueError("cannot retire the signing key; rotate first")
        self._keys.pop(kid, None)

    def private(self, kid: str) -> Ed25519PrivateKey:
        return self._keys[kid]

    def public_keys(self) -> dict[str, bytes]:
        return {
            kid: k.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            for kid, k in self._keys.items()
        }

    def merge_from(self, directory: Path) -> bool:
        """Take in keys other core replicas wrote to a shared key directory; the newest
        signs. Returns whether anything changed."""
        added = False
        for path in directory.glob("*.pem"):
            if path.stem in self._keys:
                continue
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, Ed25519PrivateKey):
                self._keys[path.stem] = key
                self.created[path.stem] = path.stat().st_mtime
                added = True
        if added:
            self._keys = dict(
                sorted(self._keys.items(), key=lambda kv: (self.created.get(kv[0], 0.0), kv[0]))
            )
        return added

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for kid, key in self._keys.items():
            path = directory / f"{kid}.pem"
            if not path.exists():
                path.write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                path.chmod(0o600)

    @classmethod
    def load_or_create(cls, directory: Path) -> KeyRing:
        keys: dict[str, Ed25519PrivateKey] = {}
        for path in sorted(directory.glob("*.pem")):
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, Ed25519PrivateKey):
                keys[path.stem] = key
        mtimes = {p.stem: p.stat().st_mtime for p in directory.glob("*.pem")}
        # Oldest first, so the newest (last) key signs after a restart.
        keys = dict(sorted(keys.items(), key=lambda kv: (mtimes.get(kv[0], 0.0), kv[0])))
        ring = cls(keys)
        ring.created.update({kid: mtimes[kid] for kid in keys if kid in mtimes})
        ring.save(directory)
        return ring


class TokenIssuer:
    def __init__(self, ring: KeyRing, ttl_s: int) -> None:
        self._ring = ring
        self.ttl_s = ttl_s

    def issue(
        self,
        *,
        session_id: str,
        role: str,
        edge_id: str,
        zone: str,
        spo2_scale: int,
        subject_id: str = "",
    ) -> tuple[str, int]:
        """Return the token and its expiry in unix ns."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        now = int(time.time())
        exp = now + self.ttl_s
        kid = self._ring.current_kid
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": session_id,
            "role": role,
            "edge": edge_id,
            "zone": zone,
            "spo2_scale": spo2_scale,
            "act": subject_id,
            "iat": now,
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._ring.private(kid), algorithm="EdDSA", headers={"kid": kid})
        return token, exp * 1_000_000_000

    def issue_user(self, *, user_id: str, role: str, ttl_s: int) -> tuple[str, int]:
        """A person's login token; return it and its expiry in unix ns."""
        if role not in USER_ROLES:
            raise ValueError(f"role must be one of {USER_ROLES}")
        now = int(time.time())
        exp = now + ttl_s
        kid = self._ring.current_kid
        claims = {
            "iss": ISSUER,
            "aud": USER_AUDIENCE,
            "sub": user_id,
            "role": role,
            "iat": now,
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, self._ring.private(kid), algorithm="EdDSA", headers={"kid": kid})
        return token, exp * 1_000_000_000


class TokenVerifier:
    """Checks tokens with public keys only; the edge never holds a signing key."""

    def __init__(
        self, public_keys: dict[str, bytes] | None = None, ring: KeyRing | None = None
    ) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        # In the core, keys come from its own ring, which other replicas may add to.
        self._ring = ring
        self.replace_keys(public_keys or (ring.public_keys() if ring else {}))

    def replace_keys(self, public_keys: dict[str, bytes]) -> None:
        self._keys = {
            kid: Ed25519PublicKey.from_public_bytes(raw) for kid, raw in public_keys.items()
        }

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

    def _decode(self, token: str | None, audience: str, what: str, leeway: int) -> dict[str, Any]:
        if not token:
            raise Unauthenticated(f"missing {what}: send 'authorization: Bearer <token>'")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"malformed {what}: {e}") from e
        key = self._keys.get(str(kid))
        if key is None and self._ring is not None:
            self.replace_keys(self._ring.public_keys())
            key = self._keys.get(str(kid))
        if key is None:
            raise Unauthenticated(f"{what} signed by unknown key id {str(kid)[:64]!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                audience=audience,
                issuer=ISSUER,
                leeway=leeway,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthenticated(f"{what} expired: ask the core for a fresh one") from e
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid {what}: {e}") from e
        return claims

    def identify(self, token: str | None) -> SessionClaims | None:
        """Whose session token this is, if it is genuine (our signature), whatever else is
        wrong with it (expired, another session or role): for audit records of refusals,
        which must never name a subject an attacker merely wrote into a forged token."""
        if not token:
            return None
        try:
            kid = str(jwt.get_unverified_header(token).get("kid"))
            key = self._keys.get(kid)
            if key is None:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"verify_exp": False, "require": ["sub", "aud", "iss"]},
            )
            return SessionClaims(
                session_id=str(claims["sub"]),
                role=str(claims.get("role", "")),
                edge_id=str(claims.get("edge", "")),
                zone=str(claims.get("zone", "")),
                spo2_scale=int(claims.get("spo2_scale", 1)),
                expires_unix=int(claims.get("exp", 0)),
                subject_id=str(claims.get("act", "")),
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return None

    def verify_user(self, token: str | None) -> UserClaims:
        """A person's login token (clinician or operator)."""
        claims = self._decode(token, USER_AUDIENCE, "login token", LEEWAY_S)
        role = claims.get("role")
        if role not in USER_ROLES:
            raise Unauthenticated(f"login token has no valid role (one of {USER_ROLES})")
        return UserClaims(str(claims["sub"]), str(role), int(claims["exp"]))

    def verify(
        self,
        token: str | None,
        *,
        session_id: str,
        roles: tuple[str, ...],
        expired_grace_s: int = 0,
    ) -> SessionClaims:
        """Raise Unauthenticated for a missing/invalid token, PermissionDenied for the wrong one.
        expired_grace_s > 0 accepts a token that expired at most that long ago (refresh only)."""
        claims = self._decode(token, AUDIENCE, "session token", LEEWAY_S + expired_grace_s)
        if claims["sub"] != session_id:
            raise PermissionDenied(f"token is for session {claims['sub']}, not {session_id}")
        if claims.get("role") not in roles:
            raise PermissionDenied(
                f"token role {claims.get('role')!r} may not do this (needs {' or '.join(roles)})"
            )
        return SessionClaims(
            session_id=claims["sub"],
            role=claims["role"],
            edge_id=str(claims.get("edge", "")),
            zone=str(claims.get("zone", "")),
            spo2_scale=int(claims.get("spo2_scale", 1)),
            expires_unix=int(claims["exp"]),
            subject_id=str(claims.get("act", "")),
        )
