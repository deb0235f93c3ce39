"""Signing in to the core's HTTP side: login, cookie and bearer, rate limits, clinicians limited
to their own patients on every console route and the FHIR export, operators without vitals,
the audit record of every read, and cross-site POSTs refused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from core_services.server import CoreServer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc
from tests.conftest import EdgeFactory, core_settings
from tests.integration.test_security_audit import _ctl

ChannelTo = Callable[[str], grpc.aio.Channel]
PASSWORD = "correct horse battery staple"


async def person(core: CoreServer, role: str, patients: tuple[str, ...] = ()) -> str:
    user = f"{role}-{uuid.uuid4().hex[:8]}"
    await core.security.users.add_user(user, role, PASSWORD)
    for p in patients:
        await core.security.users.assign(user, p)
    return user


@pytest.fixture
async def http() -> AsyncIterator[Callable[[], aiohttp.ClientSession]]:
    """Browser-like clients: each keeps its own cookies (unsafe=True: the core is on an IP)."""
    opened: list[aiohttp.ClientSession] = []

    def make() -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


async def login(
    s: aiohttp.ClientSession, core: CoreServer, user: str, password: str = PASSWORD
) -> dict[str, Any]:
    async with s.post(
        core.http.url + "/api/v1/login",
        json={"user": user, "password": password},
        headers={"Origin": core.http.url},
    ) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def opened(core: CoreServer, channel_to: ChannelTo, patient: str) -> str:
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    resp = await stub.Open(sessions_pb2.OpenSessionRequest(patient_id=patient, zone="zone-a"))
    return str(resp.session.session_id)


async def audit_rows(core: CoreServer) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    async for e in core.security.audit.entries():
        v = e.event
        rows.append((v.subject, v.action, v.patient_id, v.session_id, v.outcome, v.peer))
    return rows


async def test_login_sets_an_httponly_strict_cookie_and_cookie_and_bearer_both_work(
    core: CoreServer, http: Callable[[], aiohttp.ClientSession]
) -> None:
    user = await person(core, "clinician")
    browser = http()
    body = await login(browser, core, user)
    assert body["user"] == user and body["role"] == "clinician" and body["token"]
    async with browser.post(
        core.http.url + "/api/v1/login", json={"user": user, "password": PASSWORD}
    ) as r:
        cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("telehealth_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback; https gets Secure and __Host-
    async with browser.get(core.http.url + "/api/v1/whoami") as r:
        assert r.status == 200
        assert (await r.json())["user"] == user
    program = http()
    auth = {"Authorization": "Bearer " + body["token"]}
    async with program.get(core.http.url + "/api/v1/whoami", headers=auth) as r:
        assert r.status == 200
        assert (await r.json())["role"] == "clinician"
    async with program.get(core.http.url + "/console/api/ward", headers=auth) as r:
        assert r.status == 200


async def test_session_tokens_are_not_login_tokens(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    http: Callable[[], aiohttp.ClientSession],
) -> None:
    await edge_factory()
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    resp = await stub.Open(sessions_pb2.OpenSessionRequest(patient_id="p-1", zone="zone-a"))
    auth = {"Authorization": "Bearer " + resp.assignment.token}
    async with http().get(core.http.url + "/console/api/ward", headers=auth) as r:
        assert r.status == 401
        assert "login token" in (await r.json())["message"]


async def test_wrong_password_and_unknown_user_look_alike_and_bad_bodies_are_400(
    core: CoreServer, http: Callable[[], aiohttp.ClientSession]
) -> None:
    user = await person(core, "clinician")
    s = http()
    url = core.http.url + "/api/v1/login"
    answers = []
    for who in (user, "nobody-" + uuid.uuid4().hex[:6]):
        async with s.post(url, json={"user": who, "password": "wrong password!!"}) as r:
            assert r.status == 401
            assert "Set-Cookie" not in r.headers
            answers.append(await r.json())
    assert (
        answers[0]
        == answers[1]
        == {
            "error": "unauthenticated",
            "message": "unknown user or wrong password",
        }
    )
    for raw in (b"{not json", b"[1, 2]", b'{"user": "x"}', b'{"user": 1, "password": "p"}',
                b'{"user": "", "password": ""}', b"\xff\xfe", b""):  # fmt: skip
        async with s.post(url, data=raw, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400, raw
            assert "user" in (await r.json())["message"]
    async with s.post(url, data=b"{" + b" " * 10_000 + b"}") as r:
        assert r.status == 413


async def test_logins_are_rate_limited_per_user_and_per_address(
    tmp_path: Path, http: Callable[[], aiohttp.ClientSession]
) -> None:
    core = CoreServer(core_settings(tmp_path, login_max_attempts_per_address=8))
    await core.start()
    try:
        user = await person(core, "clinician")
        other = await person(core, "clinician")
        s = http()
        url = core.http.url + "/api/v1/login"
        for _ in range(5):
            async with s.post(url, json={"user": user, "password": "guess guess guess"}) as r:
                assert r.status == 401
        # Locked for a while, even with the right password; the answer says how long.
        async with s.post(url, json={"user": user, "password": PASSWORD}) as r:
            assert r.status == 429
            assert 0 < int(r.headers["Retry-After"]) <= 300
            assert "too many" in (await r.json())["message"]
        # Another user from the same address is not locked out by the first one's failures...
        async with s.post(url, json={"user": other, "password": PASSWORD}) as r:
            assert r.status == 200
        # ...until the address itself has made too many attempts (8 per minute here).
        statuses = []
        for _ in range(3):
            async with s.post(url, json={"user": other, "password": PASSWORD}) as r:
                statuses.append(r.status)
                retry = r.headers.get("Retry-After")
        assert statuses == [200, 200, 429]
        assert retry is not None and 0 < int(retry) <= 60
    finally:
        await core.stop(grace=0)


async def test_unauthenticated_requests_get_401_or_the_sign_in_page(
    core: CoreServer, http: Callable[[], aiohttp.ClientSession]
) -> None:
    s = http()
    base = core.http.url
    async with s.get(base + "/console", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/login?next=/console"
    async with s.get(base + "/login") as r:
        assert r.status == 200
        page = await r.text()
        assert 'type="password"' in page and "Sign in" in page
    async with s.get(base + "/static/login/login.js") as r:
        assert r.status == 200
    for method, path in (
        ("GET", "/console/api/ward"),
        ("POST", "/console/api/sessions/s-1/attach"),
        ("POST", "/console/api/sessions/s-1/invite"),
        ("GET", "/api/v1/patients/p-1/fhir"),
        ("GET", "/api/v1/whoami"),
    ):
        async with s.request(method, base + path) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "sign in" in (await r.json())["message"]
    # A forged or stale cookie is no better than none, and the browser is told to drop it.
    s.cookie_jar.update_cookies({"telehealth_session": "not.a.token"})
    async with s.get(base + "/console", allow_redirects=False) as r:
        assert r.status == 303
        assert 'telehealth_session=""' in r.headers["Set-Cookie"]
    for path in ("/metrics", "/healthz"):
        async with http().get(base + path) as r:
            assert r.status == 200


async def test_ward_lists_only_the_clinicians_patients_and_each_listing_is_audited(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    http: Callable[[], aiohttp.ClientSession],
) -> None:
    await edge_factory()
    mine = await opened(core, channel_to, "p-mine")
    await opened(core, channel_to, "p-theirs")
    dr = await person(core, "clinician", ("p-mine",))
    await person(core, "clinician", ("p-theirs",))
    s = http()
    await login(s, core, dr)
    async with s.get(core.http.url + "/console", allow_redirects=False) as r:
        assert r.status == 200
        assert r.headers["X-Frame-Options"] == "DENY"
    async with s.get(core.http.url + "/console/api/ward") as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        body = await r.json()
    assert body["clinician"] == {"id": dr, "role": "clinician"}
    assert [row["patient_id"] for row in body["sessions"]] == ["p-mine"]
    rows = await audit_rows(core)
    assert (dr, "console.ward", "p-mine", mine, "allowed", "http:127.0.0.1") in rows
    assert not [r for r in rows if r[0] == dr and r[2] == "p-theirs"]
    # The page polls: the same patient seen again at once is one continued view, one row.
    async with s.get(core.http.url + "/console/api/ward") as r:
        assert r.status == 200
    again = await audit_rows(core)
    assert again.count((dr, "console.ward", "p-mine", mine, "allowed", "http:127.0.0.1")) == 1


async def test_someone_elses_patient_is_refused_on_every_route_and_every_try_is_audited(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    http: Callable[[], aiohttp.ClientSession],
) -> None:
    edge = await edge_factory()
    mine = await opened(core, channel_to, "p-mine")
    theirs = await opened(core, channel_to, "p-theirs")
    dr = await person(core, "clinician", ("p-mine",))
    s = http()
    await login(s, core, dr)
    base, same = core.http.url, {"Origin": core.http.url}
    for what in ("attach", "invite"):
        async with s.post(f"{base}/console/api/sessions/{theirs}/{what}", headers=same) as r:
            assert r.status == 403, what
            body = await r.json()
            assert body["error"] == "permission_denied"
            assert "not assigned to you" in body["message"] and "token" not in body
    async with s.get(f"{base}/api/v1/patients/p-theirs/fhir") as r:
        assert r.status == 403
        assert "not assigned to you" in (await r.json())["message"]
    async with s.post(f"{base}/console/api/sessions/ses_nope/attach", headers=same) as r:
        assert r.status == 404

    # Their own patient: a viewer token naming the clinician, an invite link, the export.
    async with s.post(f"{base}/console/api/sessions/{mine}/attach", headers=same) as r:
        assert r.status == 200
        a = await r.json()
    assert a["edge_http"] == edge.media.http_url
    claims = core.security.verifier.verify(a["token"], session_id=mine, roles=("viewer",))
    assert claims.subject_id == dr
    async with s.post(f"{base}/console/api/sessions/{mine}/invite", headers=same) as r:
        assert r.status == 200
        # The link names the core's /join (which sends the patient on to the session's edge).
        assert (await r.json())["link"].startswith(f"{base}/join#session={mine}&token=")
    async with s.get(f"{base}/api/v1/patients/p-mine/fhir") as r:
        assert r.status == 200
        assert r.content_type == "application/fhir+json"
        assert (await r.json())["resourceType"] == "Bundle"

    rows = {r[:5] for r in await audit_rows(core)}
    assert {
        (dr, "console.attach", "p-theirs", theirs, "denied"),
        (dr, "console.invite", "p-theirs", theirs, "denied"),
        (dr, "archive.export", "p-theirs", "", "denied"),
        (dr, "console.attach", "p-mine", mine, "allowed"),
        (dr, "console.invite", "p-mine", mine, "allowed"),
        (dr, "archive.export", "p-mine", "", "allowed"),
    } <= rows
    code, out = await _ctl(["audit", "--data-dir", str(core.settings.data_dir), "verify"])
    assert code == 0 and "intact" in out


async def test_operators_get_no_vitals_over_http(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    http: Callable[[], aiohttp.ClientSession],
) -> None:
    await edge_factory()
    sid = await opened(core, channel_to, "p-1")
    ops = await person(core, "operator")
    s = http()
    await login(s, core, ops)
    base, same = core.http.url, {"Origin": core.http.url}
    async with s.get(base + "/console/api/ward") as r:
        assert r.status == 403
        assert "never vitals" in (await r.json())["message"]
    for what in ("attach", "invite"):
        async with s.post(f"{base}/console/api/sessions/{sid}/{what}", headers=same) as r:
            assert r.status == 403
            assert "never vitals" in (await r.json())["message"]
    async with s.get(base + "/api/v1/patients/p-1/fhir") as r:
        assert r.status == 403
    async with s.get(base + "/metrics") as r:
        assert r.status == 200
    denied = [r for r in await audit_rows(core) if r[0] == ops]
    assert {r[1] for r in denied} == {"console.attach", "console.invite", "archive.export"}
    assert {r[4] for r in denied} == {"denied"}


async def test_cross_site_posts_are_refused(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    http: Callable[[], aiohttp.ClientSession],
) -> None:
    await edge_factory()
    sid = await opened(core, channel_to, "p-mine")
    dr = await person(core, "clinician", ("p-mine",))
    s = http()
    token = (await login(s, core, dr))["token"]
    base = core.http.url
    url = f"{base}/console/api/sessions/{sid}/invite"
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        async with s.post(url, headers=headers) as r:
            assert r.status == 403, headers
            assert "cross-site" in (await r.json())["message"]
    async with s.post(url, headers={"Origin": base}) as r:
        assert r.status == 200
    # A program with the token in a header is not a browser riding on a cookie.
    async with http().post(url, headers={"Authorization": "Bearer " + token}) as r:
        assert r.status == 200
    # Login CSRF and forced logout from another site are refused too.
    async with http().post(
        base + "/api/v1/login",
        json={"user": dr, "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    ) as r:
        assert r.status == 403
    async with s.post(base + "/api/v1/logout", headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
    async with s.post(base + "/api/v1/logout", headers={"Origin": base}) as r:
        assert r.status == 200
    async with s.get(base + "/console/api/ward") as r:
        assert r.status == 401
