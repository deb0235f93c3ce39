"""How core replicas tell each other what changed: in-process for one core, PostgreSQL
LISTEN/NOTIFY for several replicas sharing one database."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "telehealth_mesh"
Handler = Callable[[dict[str, Any]], Awaitable[None]]


class Bus(Protocol):
    """Events are JSON objects; every replica, including the sender, receives each one once,
    except that `publish` skips the sender itself (it has applied the change already)."""

    origin: str
    shared: bool

    async def start(self, handler: Handler) -> None: ...
    async def publish(self, event: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


class LocalBus:
    """One core: nobody else to tell."""

    shared = False

    def __init__(self) -> None:
        self.origin = "local"

    async def start(self, handler: Handler) -> None:
        return None

    async def publish(self, event: dict[str, Any]) -> None:
        return None

    async def close(self) -> None:
        return None


class PgBus:
    """NOTIFY on one connection, LISTEN on another. NOTIFY payloads stay small (ids and a
    session row), far below PostgreSQL's 8000-byte limit."""

    shared = True

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self.origin = uuid.uuid4().hex[:12]
        self._listen: asyncpg.Connection | None = None
        self._send: asyncpg.Connection | None = None
        self._handler: Handler | None = None
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    async def start(self, handler: Handler) -> None:
        self._handler = handler
        self._listen = await asyncpg.connect(self._dsn)
        self._send = await asyncpg.connect(self._dsn)
        await self._listen.add_listener(CHANNEL, self._on_notify)
        # One consumer keeps events in the order PostgreSQL delivered them.
        self._task = asyncio.create_task(self._consume())
        log.info("cluster bus listening", extra={"origin": self.origin})

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed cluster event")
            return
        if event.get("origin") != self.origin:
            self._queue.put_nowait(event)

    async def _consume(self) -> None:
        assert self._handler is not None
        while True:
            event = await self._queue.get()
            try:
                await self._handler(event)
            except Exception:
                log.exception("cluster event failed", extra={"kind": event.get("kind")})

    async def publish(self, event: dict[str, Any]) -> None:
        assert self._send is not None
        payload = json.dumps({**event, "origin": self.origin}, separators=(",", ":"))
        async with self._send_lock:
            await self._send.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for conn in (self._listen, self._send):
            if conn is not None:
                await conn.close()
