"""The edge's link to the core: heartbeats with load up, keys/assignments/drain down, reconnecting."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

import grpc

from edge_nodes.vitals.sessions import EdgeSessions
from telehealth.config import EdgeSettings
from telehealth.rpc import CORE_LINK_BACKOFF_CAP_S, channel_options, secure_channel, wait_backoff
from telehealth.security.tokens import TokenVerifier
from telehealth.telemetry.metrics import EdgeMetrics
from telehealth.v1 import edges_pb2, edges_pb2_grpc

log = logging.getLogger(__name__)

MIN_REPORT_SPACING_S = 0.02


class CpuGauge:
    """Process CPU % since the last reading (os.times: no extra dependency for one number)."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._cpu())

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def percent(self) -> float:
        now, cpu = time.monotonic(), self._cpu()
        wall, used = now - self._last[0], cpu - self._last[1]
        self._last = (now, cpu)
        return 100.0 * used / wall if wall > 0 else 0.0


class CoreLink:
    def __init__(
        self,
        settings: EdgeSettings,
        address: str,
        sessions: EdgeSessions,
        verifier: TokenVerifier,
        metrics: EdgeMetrics,
    ) -> None:
        self._settings = settings
        self.address = address
        self._sessions = sessions
        self._verifier = verifier
        self._metrics = metrics
        self._cpu = CpuGauge()
        self.keys_received = asyncio.Event()
        self.connected = False
        # The edge's browser-facing base URL, reported so the core's console can link to it.
        self.http_address = ""

    def _report(self) -> edges_pb2.HeartbeatRequest:
        s = self._sessions
        m = self._metrics
        accepted = int(m.batches_accepted._value.get())
        reports = []
        for sid, a in s.assignments.items():
            if a.released is not None:
                continue
            ch = s.channels.get(sid)
            n = ch.news2 if ch else None
            reports.append(
                edges_pb2.SessionReport(
                    session_id=sid,
                    last_seq=ch.watermark.value if ch else a.archived_seq,
                    news2_total=n.total if n else 0,
                    news2_band=int(n.band) if n else 0,  # type: ignore[arg-type]
                    news2_unix_ns=ch.news2_unix_ns if ch else 0,
                    subscribers=ch.subscribers if ch else 0,
                    publishers=ch.publishers if ch else 0,
                    assigned=True,
                )
            )
        m.active_sessions.set(s.active)
        return edges_pb2.HeartbeatRequest(
            edge_id=self._settings.edge_id,
            zone=self._settings.zone,
            address=self.address,
            load=edges_pb2.EdgeLoad(
                active_sessions=s.active,
                subscribers=s.subscribers,
                capacity_sessions=self._settings.capacity_sessions,
                cpu_percent=self._cpu.percent(),
                batches_in_total=accepted,
            ),
            sessions=reports,
            sent_unix_ns=time.time_ns(),
            http_address=self.http_address,
            tls_server_name=self._settings.tls_server_name,
        )

    async def _requests(self, stop: asyncio.Event) -> AsyncIterator[edges_pb2.HeartbeatRequest]:
        while not stop.is_set():
            report_now = self._sessions.report_now
            report_now.clear()
            yield self._report()
            self._metrics.heartbeats.inc()
            # Coalesce bursts (many assignments at once) into one report per interval.
            await asyncio.sleep(MIN_REPORT_SPACING_S)
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(report_now.wait())}
            _, pending = await asyncio.wait(
                waits, timeout=self._settings.heartbeat_interval_s, return_when="FIRST_COMPLETED"
            )
            for w in pending:
                w.cancel()

    async def _handle(self, resp: edges_pb2.HeartbeatResponse) -> None:
        kind = resp.WhichOneof("command")
        if kind == "token_keys":
            self._verifier.replace_keys({k.kid: k.ed25519_public_key for k in resp.token_keys.keys})
            self.keys_received.set()
        elif kind == "assigned":
            s = resp.assigned.session
            await self._sessions.assign(
                s.session_id, int(s.spo2_scale), s.archived_seq, s.patient_id
            )
            # Tell the core at once that this edge holds the session (make-before-break).
            self._sessions.report_now.set()
        elif kind == "released":
            r = resp.released
            await self._sessions.release(r.session_id, r.reason, r.new_edge_id, r.new_edge_address)
            log.info("session released", extra={"session": r.session_id, "reason": r.reason})
        elif kind == "moving":
            m = resp.moving
            # Make-before-break: the publisher and viewers hear where to go; this edge keeps
            # serving them until the core's release follows.
            await self._sessions.moving(m.session_id, m.new_edge_id, m.reason)
        elif kind == "drain":
            self._sessions.draining = resp.drain.draining
            log.info("drain state changed", extra={"draining": resp.drain.draining})

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a heartbeat stream to the core open until stop; back off between attempts."""
        backoff = 0.1
        while not stop.is_set():
            # A fresh channel per attempt: renewed client certificates are read on reconnect.
            async with secure_channel(
                self._settings.core_address,
                self._settings.tls(),
                channel_options(max_reconnect_backoff_s=CORE_LINK_BACKOFF_CAP_S),
            ) as channel:
                stub = edges_pb2_grpc.EdgesServiceStub(channel)
                call = stub.Heartbeat(self._requests(stop))
                try:
                    async for resp in call:
                        if not self.connected:
                            self.connected = True
                            self._metrics.core_connected.set(1)
                            log.info(
                                "connected to core", extra={"core": self._settings.core_address}
                            )
                            backoff = 0.1
                        await self._handle(resp)
                except grpc.aio.AioRpcError as e:
                    if not stop.is_set():
                        log.warning(
                            "core link lost; retrying",
                            extra={
                                "code": e.code().name,
                                "detail": e.details(),
                                "retry_s": backoff,
                            },
                        )
                finally:
                    call.cancel()
                    if self.connected:
                        self.connected = False
                        self._metrics.core_connected.set(0)
                if stop.is_set():
                    break
                # Capped low: the core declares an edge dead after its heartbeat timeout, and
                # after a core restart every edge must be back well within it.
                backoff = await wait_backoff(stop, backoff, CORE_LINK_BACKOFF_CAP_S)
