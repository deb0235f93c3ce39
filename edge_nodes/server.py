"""Wires an edge node: vitals service, core link, metrics; one object for main() and tests."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from prometheus_client import CollectorRegistry

from edge_nodes.core_link import CoreLink
from edge_nodes.guard import AuditTrail, EdgeGuard
from edge_nodes.journal import Journal
from edge_nodes.media.edge import EdgeMedia
from edge_nodes.replicator import Replicator
from edge_nodes.vitals.domain import Limits
from edge_nodes.vitals.servicer import VitalsServicer
from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.config import EdgeSettings
from telehealth.rpc import GrpcServer, with_port
from telehealth.security.tokens import TokenVerifier
from telehealth.telemetry.http import HttpServer, metrics_app
from telehealth.telemetry.metrics import EdgeMetrics
from telehealth.v1 import vitals_pb2_grpc

log = logging.getLogger(__name__)


class EdgeServer:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.registry_metrics = CollectorRegistry()
        self.metrics = EdgeMetrics(self.registry_metrics, settings.edge_id, settings.zone)
        self.verifier = TokenVerifier()
        self.sessions = EdgeSessions(
            settings.edge_id,
            Limits(
                max_vitals=settings.max_batch_vitals,
                max_samples=settings.max_batch_samples,
                max_clock_skew_ns=int(settings.max_clock_skew_s * 1e9),
                news2_max_input_age_ns=int(settings.news2_max_input_age_s * 1e9),
            ),
            settings.ecg_window_s,
            settings.assignment_wait_s,
        )
        self.journal = Journal(settings.data_dir / "journal.db")
        self.replicator = Replicator(
            settings.edge_id,
            settings.core_address,
            self.journal,
            self.sessions,
            self.metrics,
            tls=settings.tls(),
        )
        # Audit records persist beside the journal until the core has chained them.
        self.audit = AuditTrail(settings.edge_id, settings.data_dir / "edge-audit.db")
        self.guard = EdgeGuard(settings, self.verifier, self.audit, self.registry_metrics)
        self.grpc = GrpcServer(
            settings.grpc_listen,
            self.metrics.rpc,
            settings.grpc_max_message_bytes,
            extra_interceptors=[self.guard],
            tls=settings.tls(),
            idle_timeout_s=settings.grpc_idle_timeout_s,
        )
        self.vitals = VitalsServicer(
            self.sessions,
            self.verifier,
            self.metrics,
            settings.subscriber_queue,
            self.journal,
        )
        self.grpc.add(
            vitals_pb2_grpc.add_VitalsServiceServicer_to_server,
            self.vitals,
            "telehealth.v1.VitalsService",
        )
        http_app = metrics_app(self.registry_metrics, lambda: self.verifier.has_keys)
        # The browser's vitals view shares the guard (audit, viewer places) and the replay.
        self.media = EdgeMedia(
            settings, self.sessions, self.verifier, self.registry_metrics, self.guard, self.vitals
        )
        self.media.register(self.grpc, http_app)
        self.http = HttpServer(http_app, settings.http_listen, settings.http_tls())
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.link: CoreLink | None = None

    @property
    def address(self) -> str:
        return self.settings.advertise_address or with_port(
            self.settings.grpc_listen, self.grpc.port
        )

    async def start(self, wait_for_core: float | None = 10.0) -> None:
        self._tasks.append(asyncio.create_task(self.replicator.run(self._stop)))
        await self.grpc.start()
        await self.http.start()
        self.link = CoreLink(
            self.settings, self.address, self.sessions, self.verifier, self.metrics
        )
        self.media.start(self.http.url)
        self.link.http_address = self.media.http_url
        self._tasks.append(asyncio.create_task(self.link.run(self._stop)))
        self._tasks.append(asyncio.create_task(self.audit.ship(self.settings, self._stop)))
        # Not ready (health NOT_SERVING) until the core's token keys are here.
        self._tasks.append(asyncio.create_task(self._serve_when_keyed(self.link)))
        if wait_for_core is not None:
            await asyncio.wait_for(self.link.keys_received.wait(), wait_for_core)
            await self.grpc.set_serving(True)
        log.info(
            "edge serving",
            extra={
                "edge": self.settings.edge_id,
                "zone": self.settings.zone,
                "grpc": self.address,
                "metrics": self.http.url + "/metrics",
            },
        )

    async def _serve_when_keyed(self, link: CoreLink) -> None:
        await link.keys_received.wait()
        await self.grpc.set_serving(True)

    async def stop(self, grace: float = 1.0) -> None:
        if self._stop.is_set():
            return  # stopped already (a test, then its fixture; a signal, then a finally)
        self._stop.set()
        for ch in list(self.sessions.channels.values()):
            ch.fanout.close_all(f"edge {self.settings.edge_id} is shutting down")
        await self.media.close()
        await self.grpc.stop(grace)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.stop()
        await self.journal.close()
        self.audit.close()
        log.info("edge stopped", extra={"edge": self.settings.edge_id})

    async def __aenter__(self) -> EdgeServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
