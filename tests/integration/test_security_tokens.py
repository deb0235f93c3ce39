"""Tokens and authorization: expired, forged, wrong-session and wrong-role tokens, a clinician
reaching for another clinician's patient, operators without vitals, key rotation, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
import jwt
import pytest

from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.security.tokens import AUDIENCE, ISSUER, KeyRing, TokenIssuer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff
from tests.integration.test_vitals_path import make_batch, open_session, requests

ChannelTo = Callable[[str], grpc.aio.Channel]


async def subscribe_status(
    stub: vitals_pb2_grpc.VitalsServiceAsyncStub, sid: str, token: str
) -> grpc.StatusCode:
    call = stub.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid, include_latest=True),
        metadata=bearer(token),
    )
    try:
        await call.read()
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        call.cancel()
    return grpc.StatusCode.OK


async def status_of(coro: object) -> grpc.StatusCode:
    try:
        await coro  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_bad_tokens_are_refused_with_the_right_status(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    other = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    ring = core.keys
    expired = jwt.encode(
        {"sub": sid, "role": "viewer", "iat": 1, "exp": 2, "aud": AUDIENCE, "iss": ISSUER},
        ring.private(ring.current_kid),
        algorithm="EdDSA",
        headers={"kid": ring.current_kid},
    )
    forged, _ = TokenIssuer(KeyRing(), 60).issue(
        session_id=sid, role="viewer", edge_id="edge-a", zone="zone-a", spo2_scale=1
    )
    assert await subscribe_status(vitals, sid, expired) == grpc.StatusCode.UNAUTHENTICATED
    assert await subscribe_status(vitals, sid, forged) == grpc.StatusCode.UNAUTHENTICATED
    # Wrong session: a valid publisher token of another session.
    wrong_session = other.assignment.token
    assert await subscribe_status(vitals, sid, wrong_session) == grpc.StatusCode.PERMISSION_DENIED
    # Wrong role: the device's own publisher token may not read.
    assert (
        await subscribe_status(vitals, sid, opened.assignment.token)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    # A login token is not a session token.
    login = dict(await staff(core, "clinician", ("p-1",)))["authorization"].split()[1]
    assert await subscribe_status(vitals, sid, login) == grpc.StatusCode.UNAUTHENTICATED


async def test_clinicians_see_only_their_patients_and_operators_no_vitals(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    mine = await sessions.Open(sessions_pb2.OpenSessionRequest(patient_id="p-mine", zone="zone-a"))
    theirs = await sessions.Open(
        sessions_pb2.OpenSessionRequest(patient_id="p-theirs", zone="zone-a")
    )
    dr = await staff(core, "clinician", ("p-mine",))
    op = await staff(core, "operator")

    def attach(sid: str, md: tuple[tuple[str, str], ...] | None) -> object:
        return sessions.Attach(
            sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
            metadata=md,
        )

    sid_theirs = theirs.session.session_id
    assert await status_of(attach(sid_theirs, dr)) == grpc.StatusCode.PERMISSION_DENIED
    assert await status_of(attach(sid_theirs, op)) == grpc.StatusCode.PERMISSION_DENIED
    assert await status_of(attach(sid_theirs, None)) == grpc.StatusCode.UNAUTHENTICATED
    ok = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(
            session_id=mine.session.session_id, role=sessions_pb2.ROLE_VIEWER
        ),
        metadata=dr,
    )
    # The viewer token names the clinician; the edge audits the read under that name.
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    pub = vitals.Publish(
        requests([make_batch(mine.session.session_id, 1)]), metadata=bearer(mine.assignment.token)
    )
    assert (await pub.read()).received_seq == 1
    assert (
        await subscribe_status(vitals, mine.session.session_id, ok.assignment.token)
        == grpc.StatusCode.OK
    )
    # The clinician lists only their patient; the operator lists all, without NEWS2.
    listed = await sessions.List(sessions_pb2.ListSessionsRequest(), metadata=dr)
    assert [s.patient_id for s in listed.sessions] == ["p-mine"]
    await eventually(lambda: core.directory.live.get(mine.session.session_id), what="report")
    all_ = await sessions.List(sessions_pb2.ListSessionsRequest(), metadata=op)
    assert {s.patient_id for s in all_.sessions} == {"p-mine", "p-theirs"}
    assert all(s.news2_unix_ns == 0 for s in all_.sessions)

    # Every attempt is in the chain, the refusal and the edge's subscription too.
    async def actions() -> list[tuple[str, str, str]]:
        return [
            (e.event.action, e.event.patient_id, e.event.outcome)
            async for e in core.security.audit.entries()
        ]

    await eventually(
        lambda: _has(actions(), ("vitals.subscribe", "p-mine", "allowed")), what="edge audit"
    )
    got = await actions()
    assert ("session.attach_viewer", "p-theirs", "denied") in got
    assert ("session.attach_viewer", "p-mine", "allowed") in got
    checked, problems = await core.security.audit.verify()
    assert checked == len(got) and problems == []
    pub.cancel()


async def _has(coro: object, item: tuple[str, str, str]) -> bool:
    return item in await coro  # type: ignore[misc, operator]


async def test_operator_only_calls_and_publisher_refresh(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    await edge_factory()
    from telehealth.v1 import edges_pb2, edges_pb2_grpc

    edges = edges_pb2_grpc.EdgesServiceStub(channel_to(core.address))
    dr = await staff(core, "clinician")
    req = edges_pb2.DrainEdgeRequest(edge_id="edge-a", draining=False)
    assert await status_of(edges.Drain(req, metadata=dr)) == grpc.StatusCode.PERMISSION_DENIED
    assert await status_of(edges.Drain(req)) == grpc.StatusCode.UNAUTHENTICATED
    assert await status_of(edges.Drain(req, metadata=await staff(core, "operator"))) == (
        grpc.StatusCode.OK
    )
    opened = await open_session(core, channel_to)
    other = await open_session(core, channel_to)
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    refresh = sessions_pb2.AttachSessionRequest(
        session_id=opened.session.session_id, role=sessions_pb2.ROLE_PUBLISHER
    )
    assert await status_of(sessions.Attach(refresh)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        await status_of(sessions.Attach(refresh, metadata=bearer(other.assignment.token)))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    fresh = await sessions.Attach(refresh, metadata=bearer(opened.assignment.token))
    assert fresh.assignment.token != opened.assignment.token


async def test_key_rotation_reaches_edges(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    old_kid = core.keys.current_kid
    new_kid = core.security.rotate_keys(lambda: core.edges.broadcast(_push()))
    assert new_kid != old_kid
    await eventually(lambda: new_kid in edge.verifier._keys, what="new key at the edge")
    assert old_kid in edge.verifier._keys  # old tokens stay valid until they expire
    opened = await open_session(core, channel_to)
    assert jwt.get_unverified_header(opened.assignment.token)["kid"] == new_kid
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    call = vitals.Publish(
        requests([make_batch(opened.session.session_id, 1)]),
        metadata=bearer(opened.assignment.token),
    )
    assert (await call.read()).received_seq == 1
    call.cancel()


def _push() -> object:
    from core_services.edges.registry import PushTokenKeys

    return PushTokenKeys()


async def test_an_idle_publish_stream_is_closed(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(publish_idle_timeout_s=0.3)
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    silent = asyncio.Event()

    async def then_silent() -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
        for i in range(1, 4):
            yield vitals_pb2.PublishVitalsRequest(batch=make_batch(sid, i))
        await silent.wait()  # never set: the device goes quiet with its stream open

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in vitals.Publish(then_silent(), metadata=bearer(opened.assignment.token)):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert "no batch for 0.3s" in (err.value.details() or "")
    # What was accepted stays accepted.
    assert edge.sessions.channels[sid].watermark.value == 3


async def test_a_publisher_over_its_rate_is_paced_not_cut_off(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    # A device back from an outage sends its backlog as fast as it can: 40 batches against
    # 10/s with a burst of 5. The edge slows it down (reads each batch when the allowance
    # has refilled) and takes every one; nothing is refused.
    edge = await edge_factory(publish_rate_batches_per_s=10.0, publish_burst_batches=5)
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    batches = [make_batch(sid, i) for i in range(1, 41)]
    acks = [
        r.received_seq
        async for r in vitals.Publish(requests(batches), metadata=bearer(opened.assignment.token))
    ]
    assert acks[-1] == 40
    assert edge.sessions.channels[sid].watermark.value == 40
    # 35 beyond the burst; even a slow sender (a second to send them all) leaves 25 to wait.
    assert edge.guard.paced >= 20, "the backlog beyond the burst was paced"
    async with aiohttp.ClientSession() as http, http.get(edge.http.url + "/metrics") as r:
        assert "telehealth_edge_publish_paced_total" in await r.text()


async def test_many_parallel_streams_of_one_session_are_refused(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    # Gross abuse: one session's publisher opens many streams at once to get around pacing.
    # Each stream may owe one batch; together they owe more than a whole burst: refused.
    edge = await edge_factory(publish_rate_batches_per_s=2.0, publish_burst_batches=2)
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    go = asyncio.Event()

    async def one(seq: int) -> str:
        async def gen() -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
            await go.wait()
            yield vitals_pb2.PublishVitalsRequest(batch=make_batch(sid, seq))

        try:
            async for _ in vitals.Publish(gen(), metadata=bearer(opened.assignment.token)):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"

    calls = [asyncio.create_task(one(seq)) for seq in range(1, 13)]
    go.set()
    codes = await asyncio.gather(*calls)
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    # Taken batches are stored; refused ones were never consumed (the device resends them).
    wm = edge.sessions.channels[sid].watermark
    assert [wm.seen(seq) for seq in range(1, 13)] == [c == "OK" for c in codes]


async def test_subscribers_per_session_are_capped(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(max_subscribers_per_session=1)
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", ("p-1",)),
    )
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    first = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(viewer.assignment.token)
    )
    await eventually(lambda: edge.guard.subscribers.get(sid) == 1, what="first viewer")
    second = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(viewer.assignment.token)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await second.read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 1" in (err.value.details() or "")
    first.cancel()
