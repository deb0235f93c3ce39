"""Per-session fan-out where a slow subscriber loses its own oldest events and nobody waits."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SubscriberClosed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscriber(Generic[T]):
    """A bounded queue of events. offer() never blocks: when full the oldest event goes,
    and the count of dropped events is handed to the reader before the next events."""

    def __init__(self, capacity: int, on_drop: Callable[[int], None] | None = None) -> None:
        self._q: deque[T] = deque()
        self._capacity = capacity
        self._ready = asyncio.Event()
        self._dropped = 0
        self._closed: str | None = None
        self._on_drop = on_drop

    def offer(self, event: T) -> None:
        if self._closed is not None:
            return
        if len(self._q) >= self._capacity:
            self._q.popleft()
            self._dropped += 1
            if self._on_drop is not None:
                self._on_drop(1)
        self._q.append(event)
        self._ready.set()

    def close(self, reason: str) -> None:
        self._closed = reason
        self._ready.set()

    async def take(self) -> tuple[int, list[T]]:
        """Wait for events; return (events dropped since the last take, events in order)."""
        while not self._q:
            if self._closed is not None:
                raise SubscriberClosed(self._closed)
            self._ready.clear()
            await self._ready.wait()
        events = list(self._q)
        self._q.clear()
        dropped, self._dropped = self._dropped, 0
        return dropped, events

    @property
    def depth(self) -> int:
        return len(self._q)


class Fanout(Generic[T]):
    def __init__(self) -> None:
        self.subscribers: set[Subscriber[T]] = set()

    def add(self, sub: Subscriber[T]) -> None:
        self.subscribers.add(sub)

    def remove(self, sub: Subscriber[T]) -> None:
        self.subscribers.discard(sub)

    def publish(self, event: T) -> None:
        for sub in self.subscribers:
            sub.offer(event)

    def close_all(self, reason: str) -> None:
        for sub in self.subscribers:
            sub.close(reason)
