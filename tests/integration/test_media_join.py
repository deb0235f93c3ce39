"""The patient's invite link goes through the core, which knows where the session lives: after a
move it sends the patient page to the new edge with a fresh token, and the old edge's
WebSocket tells the page (and the console) that the session is moving."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from tests.conftest import EdgeFactory
from tests.integration.test_media_audit import ws_view
from tests.integration.test_media_call import open_session

ChannelTo = Callable[[str], grpc.aio.Channel]


async def join(core: CoreServer, body: Any) -> tuple[int, dict[str, Any], str]:
    async with (
        aiohttp.ClientSession() as http,
        # text/plain, as the patient page sends it (no CORS preflight from an edge's origin).
        http.post(
            core.http.url + "/api/v1/join",
            data=body if isinstance(body, str) else json.dumps(body),
            headers={"Content-Type": "text/plain"},
        ) as r,
    ):
        return r.status, await r.json(), r.headers.get("Access-Control-Allow-Origin", "")


async def test_join_names_the_sessions_edge_now_and_follows_a_move(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edges: dict[str, EdgeServer] = {}
    for name in ("edge-a", "edge-b"):
        edges[name] = await edge_factory(
            name, "zone-a", media_udp_port_min=41800, media_udp_port_max=41831
        )
    s = await open_session(core, channel_to, "p-join")
    first = (await core.directory.get(s.session_id)).edge_id
    status, body, cors = await join(core, {"session_id": s.session_id, "token": s.publisher_token})
    assert status == 200 and cors == "*"
    assert body["edge_id"] == first
    assert body["link"].startswith(
        f"{edges[first].media.http_url}/patient#session={s.session_id}&token="
    )
    assert body["link"].endswith(f"&join={core.http.url}/join")
    # The page on the old edge follows the session; the core moves it (a drain).
    async with ws_view(edges[first], s.session_id, s.publisher_token) as (ws, welcome):
        assert welcome["type"] == "welcome" and welcome["role"] == "publisher"
        _, moved = await core.directory.relocate(s.session_id, "drain")
        assert moved
        while True:
            msg = await ws.receive_json(timeout=10)
            if msg["type"] == "moving":
                break
        second = (await core.directory.get(s.session_id)).edge_id
        assert second != first and msg["moving"]["new_edge_id"] == second
    # The same (old) token at /join: the new edge's page, with a token for it.
    status, body, _ = await join(core, {"session_id": s.session_id, "token": s.publisher_token})
    assert status == 200 and body["edge_id"] == second
    assert body["link"].startswith(edges[second].media.http_url + "/patient#")
    async with ws_view(edges[second], s.session_id, body["token"]) as (_, welcome):
        assert welcome["type"] == "welcome"


async def test_join_refuses_what_is_not_the_patients_token(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    await edge_factory(media_udp_port_min=41840, media_udp_port_max=41871)
    s = await open_session(core, channel_to, "p-join-bad")
    other = await open_session(core, channel_to, "p-join-other")
    cases = [
        ({"session_id": s.session_id, "token": "junk"}, 401, "malformed"),
        ({"session_id": s.session_id, "token": s.viewer_token}, 403, "needs publisher"),
        ({"session_id": s.session_id, "token": other.publisher_token}, 403, "not " + s.session_id),
        ({"token": s.publisher_token}, 400, "session_id"),
        ("{not json", 400, "JSON"),
    ]
    for body, code, words in cases:
        status, answer, cors = await join(core, body)
        assert status == code, answer
        assert words in answer["message"] and cors == "*"
