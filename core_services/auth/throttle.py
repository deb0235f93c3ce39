"""Attempt limits with bounded memory: sliding windows for logins (per user id and per client
address, shared by HTTP and gRPC) and token buckets for session opens per address."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 10_000


class AttemptLimit:
    """At most `limit` attempts per key within `window_s`; retry_after() says how long to wait.

    Kept in process memory: each core replica limits on its own, which still bounds guessing
    to `limit` x replicas per window. Keys are evicted oldest first past MAX_KEYS, so a flood
    of made-up user ids cannot grow memory (the per-address limit still holds such a flood).
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def retry_after(self, key: str) -> float:
        """Seconds until one more attempt is allowed; 0 when it is allowed now."""
        now = self._clock()
        hits = self._recent(key, now)
        if hits is None or len(hits) < self.limit:
            return 0.0
        return max(0.0, hits[-self.limit] + self.window_s - now)

    def note(self, key: str) -> None:
        now = self._clock()
        hits = self._recent(key, now)
        if hits is None:
            if len(self._hits) >= self._max_keys:
                self._hits.pop(next(iter(self._hits)))
            hits = self._hits[key] = deque()
        hits.append(now)
        if len(hits) > self.limit:
            hits.popleft()

    def clear(self, key: str) -> None:
        self._hits.pop(key, None)


def address_key(peer: str) -> str:
    """The host of a caller, the same whether it came over gRPC ('ipv4:10.0.0.7:51234',
    'ipv6:[::1]:5000') or HTTP ('10.0.0.7', '::1'), so both sides count one address once."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            host = peer[len(prefix) :].rsplit(":", 1)[0]
            return host.strip("[]")[:64]
    return peer[:64]


@dataclass(frozen=True)
class LoginLimits:
    max_failures_per_user: int = 5
    failure_window_s: float = 300.0
    max_attempts_per_address: int = 30
    address_window_s: float = 60.0


class LoginThrottle:
    """Sign-in limits shared by the HTTP login and gRPC AuthService.Login: guesses against a
    user id, or from an address, count the same whichever door they come through."""

    def __init__(self, limits: LoginLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._user_failures = AttemptLimit(
            limits.max_failures_per_user, limits.failure_window_s, clock
        )
        self._address_attempts = AttemptLimit(
            limits.max_attempts_per_address, limits.address_window_s, clock
        )

    def wait_s(self, address: str, user_id: str) -> float:
        """0 when this attempt may go ahead; else seconds until one may."""
        return max(
            self._address_attempts.retry_after(address), self._user_failures.retry_after(user_id)
        )

    def attempt(self, address: str) -> None:
        self._address_attempts.note(address)

    def failed(self, user_id: str) -> None:
        self._user_failures.note(user_id)

    def succeeded(self, user_id: str) -> None:
        self._user_failures.clear(user_id)


class RateLimit:
    """A token bucket per key (`rate` per second up to `burst`), LRU-bounded: for calls that
    are fine in bursts but not as a flood, such as opening sessions from one address."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.rate, self.burst = rate, float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Spend one token for key: 0 when allowed, else seconds until one is there."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return 0.0
