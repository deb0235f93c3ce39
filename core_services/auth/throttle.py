"""Sliding-window attempt limits for logins: per user id and per client address, bounded memory."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

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
