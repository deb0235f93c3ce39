"""Password hashing with scrypt (hashlib, RFC 7914): salted, memory-hard, constant-time checks.

Parameters follow the OWASP Password Storage Cheat Sheet, which lists equally strong scrypt
settings: N=2^17 r=8 p=1, N=2^16 r=8 p=2, N=2^15 r=8 p=3, N=2^14 r=8 p=5, N=2^13 r=8 p=10.
The default is N=2^14, r=8, p=5: the same work as the others with the least memory per check
(16 MiB), so concurrent logins cannot run the core out of memory. The parameters are stored
with each hash, and a hash made with other (older, weaker) ones is replaced at the next
successful login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

R = 8
DKLEN = 32
MIN_LENGTH = 12
MAX_LENGTH = 1024
# OWASP's pairs (N -> the p that goes with it); a configured N with a smaller p is weaker.
OWASP = {2**17: 1, 2**16: 2, 2**15: 3, 2**14: 5, 2**13: 10}
# Stored parameters beyond these are refused, not computed: a tampered hash must not make
# one login cost gigabytes.
MAX_N, MAX_P = 2**20, 16
MAX_MEM = 256 * 1024 * 1024


class WeakPassword(ValueError):
    pass


@dataclass(frozen=True)
class ScryptParams:
    n: int = 2**14
    p: int = 5
    r: int = R

    def meets_owasp(self) -> bool:
        return self.r >= R and any(self.n >= n and self.p >= p for n, p in OWASP.items())


DEFAULT = ScryptParams()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=MAX_MEM)


def hash_password(password: str, params: ScryptParams = DEFAULT) -> str:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"password must have at most {MAX_LENGTH} characters")
    salt = os.urandom(16)
    dk = _scrypt(password, salt, params.n, params.r, params.p, DKLEN)
    return f"scrypt${params.n}${params.r}${params.p}${_b64(salt)}${_b64(dk)}"


def params_of(stored: str) -> ScryptParams | None:
    try:
        scheme, n, r, p, _salt, _dk = stored.split("$")
        if scheme != "scrypt":
            return None
        return ScryptParams(n=int(n), p=int(p), r=int(r))
    except ValueError:
        return None


def needs_rehash(stored: str, params: ScryptParams) -> bool:
    """A hash made with other parameters than the configured ones (rehash it on login)."""
    return params_of(stored) != params


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, dk = stored.split("$")
        if scheme != "scrypt" or len(password) > MAX_LENGTH:
            return False
        if not (1 < int(n) <= MAX_N and 0 < int(p) <= MAX_P and 0 < int(r) <= 32):
            return False
        want = base64.b64decode(dk)
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(want))
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


def dummy_hash(params: ScryptParams) -> str:
    """A hash of a random password with these parameters: an unknown user costs the same time
    as a wrong password, so response time does not tell which user ids exist."""
    return hash_password(_b64(os.urandom(24)), params)
