"""Bad offers, wrong tokens, a second patient, a vanishing patient: clear errors, nothing leaks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import aioice.ice
import grpc
import pytest
from aiortc.mediastreams import AudioStreamTrack

from clients.video import PUBLISHER, VIEWER, MediaCall, synthetic_track
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.rpc import bearer
from telehealth.v1 import media_pb2, media_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from tests.conftest import EdgeFactory, Metadata, eventually, staff
from tests.integration.test_media_call import (
    Session,
    clinician_call,
    live_peer_connections,
    open_session,
    patient_call,
)


@pytest.fixture
async def media_edge(edge_factory: EdgeFactory) -> AsyncIterator[EdgeServer]:
    edge = await edge_factory(media_udp_port_min=41100, media_udp_port_max=41131)
    yield edge
    await eventually(lambda: edge.media.calls.peer_count == 0, what="edge peers closed")


async def valid_offer() -> tuple[MediaCall, str]:
    """A real offer from a throwaway peer (closed by the caller)."""
    call = MediaCall("unused", "s", "t", PUBLISHER, video=synthetic_track(width=160, height=120))
    return call, await call.offer()


async def negotiate(
    channel: grpc.aio.Channel, session_id: str, role: int, sdp: str, token: str
) -> media_pb2.NegotiateMediaResponse:
    stub = media_pb2_grpc.MediaServiceStub(channel)
    resp: media_pb2.NegotiateMediaResponse = await stub.Negotiate(
        media_pb2.NegotiateMediaRequest(session_id=session_id, role=role, offer_sdp=sdp),  # type: ignore[arg-type]
        metadata=bearer(token),
        timeout=10,
    )
    return resp


async def expect_status(coro: object, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro  # type: ignore[misc]
    assert err.value.code() == code, err.value.details()
    assert words in (err.value.details() or ""), err.value.details()


async def test_garbage_and_truncated_sdp_are_invalid_argument_and_a_call_goes_on(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    s = await open_session(core, channel_to)
    ch = channel_to(media_edge.address)
    patient = patient_call(media_edge, s)
    clinician = clinician_call(media_edge, s)
    probe, offer = await valid_offer()
    try:
        await patient.start()
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 5, 20, "call running")
        other = await open_session(core, channel_to, "p-2")
        cases = [
            ("", "empty"),
            ("hello, I am not SDP", "must start with 'v=0'"),
            ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF\r\n", "malformed SDP"),
            (offer[: len(offer) // 3], "truncated"),
            (offer.replace("a=candidate", "a=x-nothing"), "no ICE candidates"),
            ("v=0\r\n" + "a=x\r\n" * 20000, "larger than"),
        ]
        for sdp, words in cases:
            await expect_status(
                negotiate(ch, other.session_id, PUBLISHER, sdp, other.publisher_token),
                grpc.StatusCode.INVALID_ARGUMENT,
                words,
            )
        before = clinician.received.frames
        await eventually(lambda: clinician.received.frames > before + 10, 20, "call unaffected")
        assert media_edge.media.calls.peer_count == 2
    finally:
        await probe.close()
        await patient.hangup()
        await clinician.hangup()
    assert live_peer_connections() == 0


async def test_offer_for_another_session_and_wrong_role_are_permission_denied(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    a = await open_session(core, channel_to, "p-a")
    b = await open_session(core, channel_to, "p-b")
    ch = channel_to(media_edge.address)
    probe, offer = await valid_offer()
    try:
        await expect_status(
            negotiate(ch, b.session_id, PUBLISHER, offer, a.publisher_token),
            grpc.StatusCode.PERMISSION_DENIED,
            f"not {b.session_id}",
        )
        # A clinician's (viewer) token cannot publish as the patient, nor the reverse.
        await expect_status(
            negotiate(ch, a.session_id, PUBLISHER, offer, a.viewer_token),
            grpc.StatusCode.PERMISSION_DENIED,
            "needs publisher",
        )
        await expect_status(
            negotiate(ch, a.session_id, VIEWER, offer, a.publisher_token),
            grpc.StatusCode.PERMISSION_DENIED,
            "needs viewer",
        )
        await expect_status(
            negotiate(ch, a.session_id, PUBLISHER, offer, "not-a-token"),
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed",
        )
        await expect_status(
            negotiate(ch, a.session_id, 0, offer, a.publisher_token),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role must be",
        )
    finally:
        await probe.close()
    assert media_edge.media.calls.peer_count == 0


async def test_second_patient_for_a_session_is_refused_while_the_first_is_connected(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    s = await open_session(core, channel_to)
    first = patient_call(media_edge, s)
    second = patient_call(media_edge, s)
    try:
        await first.start()
        await eventually(lambda: first.pc.connectionState == "connected", 10, "first connected")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await second.start()
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "already has a patient" in (err.value.details() or "")
        assert media_edge.media.calls.peer_count == 1
    finally:
        await second.close()
        await first.hangup()
    assert live_peer_connections() == 0


async def test_patient_vanishing_mid_call_is_cleaned_up_and_can_rejoin(
    core: CoreServer,
    media_edge: EdgeServer,
    channel_to: Callable[[str], grpc.aio.Channel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shortened ICE consent timers (as aiortc's own tests do): a silent peer fails in ~2 s.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 3)
    s = await open_session(core, channel_to)
    patient = patient_call(media_edge, s)
    clinician = clinician_call(media_edge, s)
    try:
        await patient.start()
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 5, 20, "call running")
        edge_patient = media_edge.media.calls.calls[s.session_id].patient
        assert edge_patient is not None
        # The device disappears without a word: its sockets go silent, no hang-up, no DTLS close.
        for t in patient.pc.getTransceivers():
            for proto in t.receiver.transport.transport.iceGatherer._connection._protocols:
                proto.transport.close()
        await eventually(lambda: edge_patient.closed, 20, "edge notices the patient left")
        call = media_edge.media.calls.calls[s.session_id]
        assert not call.state().patient_connected and call.state().clinicians_connected == 1
        await patient.close()
        # The device comes back on a new connection and the clinician sees it again.
        again = patient_call(media_edge, s)
        before = clinician.received.frames
        await again.start()
        await eventually(lambda: clinician.received.frames > before + 10, 20, "patient rejoined")
        await again.hangup()
    finally:
        await patient.close()
        await clinician.hangup()
    assert live_peer_connections() == 0


async def test_http_offer_errors_have_status_and_reason(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    s: Session = await open_session(core, channel_to)
    base = media_edge.media.http_url
    url = f"{base}/media/sessions/{s.session_id}/offer"
    probe, offer = await valid_offer()
    try:
        async with aiohttp.ClientSession() as http:
            cases = [
                ({}, {"sdp": offer, "role": "publisher"}, 401, "missing session token"),
                ({}, {"sdp": offer, "role": "publisher", "token": s.viewer_token}, 403, "needs publisher"),
                ({"Authorization": f"Bearer {s.publisher_token}"}, {"sdp": "junk", "role": "publisher"}, 400, "v=0"),
                ({"Authorization": f"Bearer {s.publisher_token}"}, {"role": "publisher"}, 400, '"sdp"'),
                ({"Authorization": f"Bearer {s.publisher_token}"}, {"sdp": offer, "role": "admin"}, 400, "role must be"),
            ]  # fmt: skip
            for headers, body, status, words in cases:
                async with http.post(url, json=body, headers=headers) as r:
                    assert r.status == status, await r.text()
                    assert words in (await r.json())["message"]
                    assert r.headers["Access-Control-Allow-Origin"] == "*"
            async with http.post(url, data=b"{not json", headers={"Authorization": f"Bearer {s.publisher_token}"}) as r:  # fmt: skip
                assert r.status == 400
    finally:
        await probe.close()
    assert media_edge.media.calls.peer_count == 0


async def test_candidate_ports_exhausted_is_resource_exhausted(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(
        "edge-small", "zone-a", media_udp_port_min=41190, media_udp_port_max=41190
    )
    s = await open_session(core, channel_to)
    # edge-small is the only edge (this test starts no other), so placement must put the
    # session there; a skip here would hide a placement change instead of testing the range.
    assert (await core.directory.get(s.session_id)).edge_id == "edge-small"
    ok = patient_call(edge, s)
    viewer = MediaCall(edge.address, s.session_id, s.viewer_token, VIEWER, audio=AudioStreamTrack())
    try:
        await ok.start()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await viewer.start()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "41190-41190" in (err.value.details() or "")
    finally:
        await viewer.close()
        await ok.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, what="peers closed")


async def viewer_token_for(
    core: CoreServer, channel_to: Callable[[str], grpc.aio.Channel], sid: str, staff_md: Metadata
) -> str:
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    resp = await stub.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=staff_md,
    )
    return resp.assignment.token


async def test_only_the_caller_who_joined_may_hang_up_a_call(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    s = await open_session(core, channel_to)
    dr_b = await staff(core, "clinician", ("p-1",))
    b_token = await viewer_token_for(core, channel_to, s.session_id, dr_b)
    patient = patient_call(media_edge, s)
    a = clinician_call(media_edge, s)
    b = MediaCall(media_edge.address, s.session_id, b_token, VIEWER, audio=AudioStreamTrack())
    stub = media_pb2_grpc.MediaServiceStub(channel_to(media_edge.address))

    async def hangup(call: MediaCall, token: str) -> media_pb2.HangupMediaResponse:
        req = media_pb2.HangupMediaRequest(session_id=s.session_id, call_id=call.call_id)
        resp: media_pb2.HangupMediaResponse = await stub.Hangup(
            req, metadata=bearer(token), timeout=10
        )
        return resp

    try:
        for c in (patient, a, b):
            await c.start()
        assert media_edge.media.calls.peer_count == 3
        # The patient cannot end a clinician's call; one clinician cannot end another's;
        # a clinician cannot end the patient's.
        for call, token in ((a, s.publisher_token), (a, b_token), (patient, s.viewer_token)):
            await expect_status(hangup(call, token), grpc.StatusCode.PERMISSION_DENIED, "not yours")
        base = media_edge.media.http_url
        async with aiohttp.ClientSession() as http:
            url = f"{base}/media/sessions/{s.session_id}/calls/{b.call_id}/hangup"
            async with http.post(url, json={"token": s.publisher_token}) as r:
                assert r.status == 403 and "not yours" in (await r.json())["message"]
        assert media_edge.media.calls.peer_count == 3
        # Each ends its own, with a fresh token of the same person too.
        fresh_b = await viewer_token_for(core, channel_to, s.session_id, dr_b)
        assert (await hangup(b, fresh_b)).ended
        assert (await hangup(patient, s.publisher_token)).ended
        assert (await hangup(a, s.viewer_token)).ended
        await eventually(lambda: media_edge.media.calls.peer_count == 0, 10, "all hung up")
    finally:
        for c in (patient, a, b):
            await c.close()
    assert live_peer_connections() == 0
