"""Wires the core's contexts (store, edge registry, sessions) into one serving process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry

from core_services.archive.archive import Archive
from core_services.archive.http import add_archive_routes
from core_services.archive.servicer import ArchiveServicer
from core_services.archive.store import ArchiveStore
from core_services.auth.security import CoreSecurity
from core_services.bus import Bus, LocalBus, PgBus
from core_services.console.app import Console
from core_services.edges.discovery import DiscoveredEdge
from core_services.edges.registry import EdgeRegistry, PushTokenKeys
from core_services.edges.servicer import EdgesServicer
from core_services.sessions.directory import SessionDirectory
from core_services.sessions.domain import ZoneLatency
from core_services.sessions.servicer import SessionsServicer
from core_services.store import SqlStore
from telehealth.config import CoreSettings
from telehealth.rpc import EDGE_RECONNECT_MAX_S, GrpcServer, with_port
from telehealth.security.tokens import KeyRing, TokenIssuer
from telehealth.telemetry.http import HttpServer, metrics_app
from telehealth.telemetry.metrics import CoreMetrics
from telehealth.v1 import archive_pb2_grpc, edges_pb2_grpc, sessions_pb2_grpc

log = logging.getLogger(__name__)

KEY_POLL_S = 2.0
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _pod_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return "default"


class CoreServer:
    """The core as an object: start(), address, stop(). main() and tests both use it."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.registry_metrics = CollectorRegistry()
        self.metrics = CoreMetrics(self.registry_metrics)
        self.store = SqlStore(settings.resolved_database_url())
        self.keys = KeyRing.load_or_create(settings.resolved_keys_dir())
        self.issuer = TokenIssuer(self.keys, settings.token_ttl_s)
        self.edges = EdgeRegistry(self.store, self.metrics, settings.heartbeat_timeout_s)
        self.edges.shared = settings.cluster
        self.edges.tls = settings.tls()
        self.bus: Bus = PgBus(self.store.url) if settings.cluster else LocalBus()
        self.directory = SessionDirectory(
            self.store,
            self.edges,
            self.issuer,
            ZoneLatency(settings.zone_latency_ms),
            self.metrics,
            bus=self.bus,
        )
        self.security = CoreSecurity(
            settings, self.store, self.keys, self.issuer, self.directory, self.edges
        )
        self.grpc = GrpcServer(
            settings.grpc_listen,
            self.metrics.rpc,
            settings.grpc_max_message_bytes,
            extra_interceptors=[self.security.interceptor],
            tls=settings.tls(),
            idle_timeout_s=settings.grpc_idle_timeout_s,
        )
        self.security.register(self.grpc)
        self.grpc.add(
            sessions_pb2_grpc.add_SessionsServiceServicer_to_server,
            SessionsServicer(self.directory),
            "telehealth.v1.SessionsService",
        )
        self.grpc.add(
            edges_pb2_grpc.add_EdgesServiceServicer_to_server,
            EdgesServicer(self.edges, self.directory, self.keys),
            "telehealth.v1.EdgesService",
        )
        self.archive = Archive(ArchiveStore(self.store), self.metrics, shared=settings.cluster)
        self.directory.archive = self.archive
        self.grpc.add(
            archive_pb2_grpc.add_ArchiveServiceServicer_to_server,
            ArchiveServicer(self.archive),
            "telehealth.v1.ArchiveService",
        )
        self.http_app = metrics_app(self.registry_metrics, lambda: self._serving)
        # Sign-in first: its middleware guards every route added after it (default deny).
        self.security.http.add_routes(self.http_app)
        add_archive_routes(self.http_app, self.archive, self.security.policy)
        Console(self.directory, self.edges, self.security.policy).add_routes(self.http_app)
        self.http = HttpServer(self.http_app, settings.http_listen, settings.http_tls())
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._serving = False

    @property
    def address(self) -> str:
        return with_port(self.settings.grpc_listen, self.grpc.port)

    async def start(self) -> None:
        await self.store.start()
        await self.security.start()
        await self.edges.load()
        await self.directory.load()
        await self.bus.start(self.directory.handle_event)
        if self.settings.cluster:
            self._tasks.append(asyncio.create_task(self._follow_shared_keys()))
        await self.grpc.start()
        await self.http.start()
        self._tasks.append(
            asyncio.create_task(
                self.security.run_rotation(
                    self._stop, lambda: self.edges.broadcast(PushTokenKeys())
                )
            )
        )
        if self.settings.discovery == "kubernetes":
            self._tasks.append(asyncio.create_task(self._discover()))
        await self.grpc.set_serving(True)
        self._serving = True
        # Liveness clocks start now, not at load(): edges that were connected before a restart
        # get the heartbeat timeout plus their longest reconnect backoff to come back.
        self.edges.start_liveness(EDGE_RECONNECT_MAX_S)
        self._tasks.append(asyncio.create_task(self.edges.run_liveness(self._stop)))
        log.info(
            "core serving",
            extra={
                "grpc": self.address,
                "metrics": self.http.url + "/metrics",
                "database": self.store.dialect,
                "sessions_recovered": len(self.directory.sessions),
                "edges_known": len(self.edges.edges),
            },
        )

    async def _follow_shared_keys(self) -> None:
        """Replicas share the key directory: a key one of them (or an operator) adds is
        signed with and pushed to edges by all."""
        while not self._stop.is_set():
            try:
                if self.keys.merge_from(self.settings.resolved_keys_dir()):
                    self.edges.broadcast(PushTokenKeys())
            except OSError:
                log.exception("cannot read the shared key directory")
            try:
                await asyncio.wait_for(self._stop.wait(), KEY_POLL_S)
            except TimeoutError:
                pass

    async def _discover(self) -> None:
        """In a cluster: EndpointSlices of the edge Service tell the core which edges exist."""
        from core_services.edges.discovery import EndpointSliceDiscovery, in_cluster_api

        namespace = self.settings.kubernetes_namespace or _pod_namespace()
        discovery = EndpointSliceDiscovery(
            namespace, self.settings.kubernetes_edge_service, in_cluster_api()
        )
        try:
            await discovery.run(self._on_discovered)
        finally:
            discovery.stop()

    async def _on_discovered(self, found: list[DiscoveredEdge]) -> None:
        await self.edges.apply_discovery(found)

    async def stop(self, grace: float = 1.0) -> None:
        self._serving = False
        self._stop.set()
        await self.grpc.stop(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.directory.shutdown()
        await self.http.stop()
        await self.bus.close()
        await self.store.close()
        log.info("core stopped")

    async def __aenter__(self) -> CoreServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
