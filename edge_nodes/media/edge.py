"""The media side of an edge node as one object: what EdgeServer registers, starts and stops."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge_nodes.guard import EdgeGuard
from edge_nodes.media.consultations import Consultations
from edge_nodes.media.http import MediaHttp
from edge_nodes.media.servicer import MediaServicer
from edge_nodes.vitals.servicer import VitalsServicer
from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.config import EdgeSettings
from telehealth.rpc import GrpcServer
from telehealth.security.tokens import TokenVerifier
from telehealth.telemetry.metrics import MediaMetrics
from telehealth.v1 import media_pb2_grpc


class EdgeMedia:
    def __init__(
        self,
        settings: EdgeSettings,
        sessions: EdgeSessions,
        verifier: TokenVerifier,
        registry: CollectorRegistry,
        guard: EdgeGuard,
        vitals: VitalsServicer,
    ) -> None:
        """guard: the edge's audit trail and viewer places (shared with gRPC Subscribe);
        vitals: its journal replay, so a browser view resumes like a gRPC one."""
        self.metrics = MediaMetrics(registry, settings.edge_id, settings.zone)
        self.calls = Consultations(settings, sessions, verifier, self.metrics, guard.audit)
        self._http = MediaHttp(self.calls, sessions, guard, vitals)
        self._advertise = settings.http_advertise_url.rstrip("/")
        self.http_url = ""

    def register(self, grpc: GrpcServer, app: web.Application) -> None:
        grpc.add(
            media_pb2_grpc.add_MediaServiceServicer_to_server,
            MediaServicer(self.calls),
            "telehealth.v1.MediaService",
        )
        self._http.add_routes(app)

    def start(self, bound_http_url: str) -> None:
        """Start the quality loop; bound_http_url is used when no http_advertise_url is set."""
        self.http_url = self._advertise or bound_http_url
        self.calls.start()

    async def close(self) -> None:
        await self.calls.close()
