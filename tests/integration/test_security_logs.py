"""Logs and metrics never carry tokens, passwords or raw vitals: run traffic through core, edge
and a real device agent (with a batch the edge must refuse), then grep every captured line."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import aiohttp
import grpc

from clients.device import DeviceAgent, DeviceConfig
from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_vitals_path import make_batch, requests

PASSWORD = "tr0ub4dor&3-horse-battery"
# Distinctive readings: if they show up anywhere in logs or metrics, raw vitals leaked.
ODD_HR = 123.456
ODD_TEMP = 37.891
# Impossible readings the edge must refuse: rejection messages quote what was wrong, and
# those messages travel to logs on the edge and the device unless they are kept out.
BAD_HR = 913.7
BAD_SPO2 = 131.3
# When a record was made: floats that could spell a needle by chance (…913.7… seconds).
TIME_ATTRS = {"created", "msecs", "relativeCreated"}


class Capture(logging.Handler):
    """Every record of every logger, as everything it carries: message, arguments, extra
    fields and any exception text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.names: set[str] = set()
        self._fmt = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)
        fields = {k: v for k, v in record.__dict__.items() if k not in TIME_ATTRS}
        self.lines.append(json.dumps(fields, default=str) + " " + self._fmt.format(record))


class OneBadBatch(DeviceAgent):
    """A device whose sensors send odd honest readings and one impossible batch."""

    async def _produce(self, stop: asyncio.Event, duration_s: float) -> None:
        await self.opened.wait()
        t0 = time.time_ns()
        for k in range(6):
            b = self.make_batch(t0, k * 0.04, True)
            v = b.vitals[0]
            v.heart_rate_bpm, v.temperature_c = ODD_HR, ODD_TEMP
            if k == 3:
                v.heart_rate_bpm, v.spo2_percent = BAD_HR, BAD_SPO2
            self.enqueue(b)


async def test_no_tokens_passwords_or_vitals_in_logs_or_metrics(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    cap = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    try:
        edge = await edge_factory()
        await core.security.users.add_user("dr-7731", "clinician", PASSWORD)
        await core.security.users.assign("dr-7731", "p-1")
        auth = auth_pb2_grpc.AuthServiceStub(channel_to(core.address))
        login = await auth.Login(auth_pb2.LoginRequest(user_id="dr-7731", password=PASSWORD))
        bad = auth.Login(auth_pb2.LoginRequest(user_id="dr-7731", password=PASSWORD + "x"))
        try:
            await bad
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
        opened = await sessions.Open(
            sessions_pb2.OpenSessionRequest(patient_id="p-1", zone="zone-a")
        )
        sid = opened.session.session_id
        viewer = await sessions.Attach(
            sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
            metadata=bearer(login.token),
        )
        vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
        sub = vitals.Subscribe(
            vitals_pb2.SubscribeVitalsRequest(session_id=sid),
            metadata=bearer(viewer.assignment.token),
        )
        batches = [make_batch(sid, i, hr=ODD_HR) for i in (1, 2)]
        for b in batches:
            b.vitals[0].temperature_c = ODD_TEMP
        # A rejected batch too: rejection messages are logged.
        bad_batch = make_batch(sid, 3, hr=BAD_HR)
        bad_batch.vitals[0].spo2_percent = BAD_SPO2
        got = [
            r
            async for r in vitals.Publish(
                requests([*batches, bad_batch]), metadata=bearer(opened.assignment.token)
            )
        ]
        assert got[-1].received_seq == 3
        assert (await sub.read()).HasField("batch")
        sub.cancel()
        assert any(r.HasField("rejection") and r.rejection.seq == 3 for r in got)
        # The device agent, in this process, logs what the edge tells it.
        agent = OneBadBatch(DeviceConfig(core.address, "p-1", "zone-a", flush_timeout_s=20))
        stats = await asyncio.wait_for(agent.run(asyncio.Event()), 60)
        wm = await core.archive.archived_seq(agent.session_id)
        rows = await core.archive.store.count(agent.session_id)
        assert stats.rejected == 1 and agent.pending == 0, (wm, rows, stats)
        await eventually(lambda: edge.audit.shipped >= 1, what="audit shipped")
        metrics = ""
        async with aiohttp.ClientSession() as http:
            for url in (core.http.url, edge.http.url):
                async with http.get(url + "/metrics") as r:
                    metrics += await r.text()
    finally:
        root.removeHandler(cap)
        root.setLevel(old_level)
    logs = "\n".join(cap.lines)
    assert logs, "no logs captured"
    secrets = {
        "login token": login.token,
        "publisher token": opened.assignment.token,
        "viewer token": viewer.assignment.token,
        "password": PASSWORD,
    }
    for what, value in secrets.items():
        # A JWT's signature alone would identify it; look for that as well as the whole.
        for needle in (value, value.rsplit(".", 1)[-1]):
            assert needle not in logs, f"{what} in logs"
            assert needle not in metrics, f"{what} in metrics"
    sources = cap.names
    # Core, edge and device all spoke, so "not found" means something.
    assert any(n.startswith("core_services") for n in sources), sources
    assert any(n.startswith("edge_nodes") for n in sources), sources
    assert "device" in sources, sources  # clients.device logs as "device"
    for reading in ("913.7", "131.3", "123.456", "123.45", "37.891", "37.89"):
        leaked = [ln for ln in cap.lines if reading in ln]
        assert not leaked, f"raw vitals {reading} in logs: {leaked[0][:400]}"
        assert reading not in metrics, f"raw vitals {reading} in metrics"
    # Metrics name sessions and patients nowhere (label cardinality and privacy alike).
    assert "p-1" not in metrics
    assert sid not in metrics
