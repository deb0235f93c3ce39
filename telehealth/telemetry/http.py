"""The HTTP side of every process: /metrics for Prometheus and /healthz, on aiohttp; HTTPS
when a certificate is configured, with renewed certificates taken up without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from telehealth.security.tls import files_stamp

log = logging.getLogger(__name__)

# How often the certificate files are looked at for a renewal.
TLS_POLL_S = 1.0


def metrics_app(registry: CollectorRegistry, healthy: Callable[[], bool]) -> web.Application:
    app = web.Application()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


class ReloadingSslContext:
    """A server SSLContext whose certificate is replaced in place when its files change: the
    listening socket keeps the same context object, and each new handshake uses whatever
    certificate it holds then. Server authentication only (browsers have no client certs)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.files = (cert, key)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = files_stamp(self.files)
        self.context.load_cert_chain(cert, key)
        self.reloads = 0

    def reload_if_changed(self) -> bool:
        stamp = files_stamp(self.files)
        if stamp == self._stamp:
            return False
        try:
            # A half-written renewal (cert and key disagreeing) raises here and changes
            # nothing: the context keeps serving the old pair.
            self.context.load_cert_chain(*self.files)
        except (OSError, ssl.SSLError) as e:
            log.warning(
                "HTTPS certificate changed but cannot be loaded; keeping the old one",
                extra={"error": str(e)},
            )
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("HTTPS certificate reloaded", extra={"cert": str(self.files[0])})
        return True


class HttpServer:
    """Runs an aiohttp app on host:port (port 0 picks a free one) and reports the bound port.
    With tls=(cert, key) it serves HTTPS and follows renewals of those files."""

    def __init__(
        self, app: web.Application, listen: str, tls: tuple[Path, Path] | None = None
    ) -> None:
        self._app = app
        self._host, port = listen.rsplit(":", 1)
        self._port = int(port)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0
        self.tls = ReloadingSslContext(*tls) if tls is not None else None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._host,
            self._port,
            ssl_context=self.tls.context if self.tls is not None else None,
        )
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        if self.tls is not None:
            self._watch = asyncio.create_task(self._follow_renewals(self.tls))
        return self.port

    async def _follow_renewals(self, tls: ReloadingSslContext) -> None:
        while True:
            await asyncio.sleep(TLS_POLL_S)
            tls.reload_if_changed()

    @property
    def app(self) -> web.Application:
        """The application served (its router lists every route, e.g. for the hostile suite)."""
        return self._app

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self._host}:{self.port}"

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._runner.cleanup()
