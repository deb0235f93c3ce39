"""Password hashing with scrypt (hashlib, RFC 7914): salted, memory-hard, constant-time checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# n=2^14, r=8, p=1: ~16 MiB and tens of milliseconds per check on a laptop core; the
# parameters are stored with each hash so they can be raised later without a migration.
N, R, P = 2**14, 8, 1
DKLEN = 32
MIN_LENGTH = 12
MAX_LENGTH = 1024


class WeakPassword(ValueError):
    pass


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def hash_password(password: str) -> str:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"password must have at most {MAX_LENGTH} characters")
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=DKLEN)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(dk)}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, dk = stored.split("$")
        if scheme != "scrypt" or len(password) > MAX_LENGTH:
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=64 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# A hash of a random password: an unknown user costs the same time as a wrong password,
# so response time does not tell an attacker which user ids exist.
DUMMY_HASH = hash_password(_b64(os.urandom(24)))
