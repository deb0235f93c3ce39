"""Headless Debian Chromium as the patient page and as the clinician console, through the edge.

Each side must receive the other's video (checked in the page's own state: a decoded width and
a growing count of decoded frames), and the run saves screenshots of both pages to
docs/screenshots/ for the README.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clients.device import DeviceAgent, DeviceConfig
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from edge_nodes.vision.synthetic import SyntheticFace
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_call import LossyUplink

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
CLINICIAN = "dr-browser"
PASSWORD = "correct horse battery staple"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Host candidates as real addresses rather than mDNS names: the edge is on this machine.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make system-packages)"
    ),
    pytest.mark.timeout(300),
]


async def launch(pw: Any, tmp: Path, name: str, extra: list[str]) -> Any:
    # A fresh profile per browser, so no state carries over between runs.
    profile = tmp / f"profile-{name}"
    return await pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=CHROMIUM,
        headless=True,
        args=FLAGS + extra,
        viewport={"width": 1280, "height": 860}
        if name == "clinician"
        else {"width": 412, "height": 915},
    )


@pytest.fixture
async def device(core: CoreServer, edge: EdgeServer) -> AsyncIterator[DeviceAgent]:
    await core.security.users.add_user(CLINICIAN, "clinician", PASSWORD)
    await core.security.users.assign(CLINICIAN, "patient-042")
    agent = DeviceAgent(
        DeviceConfig(
            core.address, "patient-042", "zone-a", scenario="deteriorating", deterioration_s=20.0
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.session_id, 10, "device opened its session")
    yield agent
    stop.set()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


@pytest.fixture
async def edge(edge_factory: EdgeFactory) -> EdgeServer:
    return await edge_factory(media_udp_port_min=41200, media_udp_port_max=41263)


async def frames_grow(page: Any, what: str) -> None:
    await eventually(
        lambda: page.evaluate("window.telehealth.remoteWidth() > 0"),
        30,
        f"{what}: video has a size",
    )
    first = await page.evaluate("window.telehealth.remoteFrames()")

    async def more() -> bool:
        return bool(await page.evaluate("window.telehealth.remoteFrames()") > first + 15)

    await eventually(more, 30, f"{what}: frames keep being decoded")


def looping_face(tmp_path: Path) -> Path:
    """The fake camera's clip. Chromium loops it, so it is made to loop seamlessly: 20 s hold
    a whole number of pulses at 75 bpm (25) and of both sway periods (5 s and 6.7 s), and the
    edge's rPPG sees one steady pulse (a 4 s clip jumped every loop and gave no pulse)."""
    clip = SyntheticFace(pulse_bpm=75.0, width=320, height=240, fps=15.0)
    return clip.write_y4m(tmp_path / "face.y4m", 20.0)


async def label(page: Any, text: str, timeout: float = 40) -> None:
    """Wait for the console's call-mode label to read `text`."""
    await eventually(
        lambda: page.evaluate(f"document.getElementById('p-mode').textContent === {text!r}"),
        timeout,
        f"the console's mode label says {text!r}",
    )


async def test_patient_page_and_console_see_each_other_through_the_edge(
    core: CoreServer, edge: EdgeServer, device: DeviceAgent, tmp_path: Path
) -> None:
    sid = device.session_id
    face = looping_face(tmp_path)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with playwright_api.async_playwright() as pw:
        clinician = await launch(pw, tmp_path, "clinician", [])
        patient = await launch(
            pw, tmp_path, "patient", [f"--use-file-for-fake-video-capture={face}"]
        )
        try:
            console = await clinician.new_page()
            # Signed out, the console sends the clinician to sign in, and back after.
            await console.goto(core.http.url + "/console")
            await console.wait_for_url("**/login?next=/console")
            await console.fill("#user", CLINICIAN)
            await console.fill("#password", "not the password")
            await console.click("#sign-in")
            await console.wait_for_selector("#message:not([hidden])")
            assert "do not match" in await console.text_content("#message")
            await console.fill("#password", PASSWORD)
            await console.click("#sign-in")
            await console.wait_for_url("**/console")
            await console.wait_for_selector(f"#clinician:has-text('Signed in as {CLINICIAN}')")
            await console.wait_for_selector(f'tr[data-session="{sid}"]', timeout=20_000)
            # Let the device's readings and a NEWS2 score arrive before the ward screenshot.
            await eventually(
                lambda: console.evaluate(
                    f"(() => {{ const p = window.telehealth.patients.get('{sid}'); return p && p.news2 && p.latest.heart_rate_bpm; }})()"
                ),
                20,
                "live vitals in the ward",
            )
            await console.wait_for_function(
                f"document.querySelector('tr[data-session=\"{sid}\"] td:nth-child(3)').textContent.trim() !== '-'"
            )
            await console.screenshot(path=str(SCREENSHOTS / "console-ward.png"))

            await console.click(f'tr[data-session="{sid}"]')
            await console.click("#invite")
            link = await eventually(
                lambda: console.evaluate("window.telehealth.inviteLink"), 10, "invite link"
            )
            # The link names the core (stable across moves), which sends the page to the edge.
            assert link.startswith(core.http.url + "/join#session=" + sid)

            page = await patient.new_page()
            await page.goto(link + "&autojoin=1")
            await page.wait_for_url(edge.media.http_url + "/patient#**")
            await eventually(
                lambda: page.evaluate("window.telehealth.connected"), 30, "patient connected"
            )

            await console.click("#call")
            await eventually(
                lambda: console.evaluate("window.telehealth.connected"), 30, "clinician connected"
            )

            await frames_grow(console, "clinician sees the patient")
            await frames_grow(page, "patient sees the clinician")
            assert edge.media.calls.peer_count == 2

            # The edge's vision looks at the patient's picture and tells the page.
            await eventually(lambda: page.evaluate("window.telehealth.hint"), 30, "a vision hint")
            await eventually(
                lambda: console.evaluate(
                    "window.telehealth.stats && window.telehealth.stats.fps > 0"
                ),
                20,
                "call quality figures",
            )
            await label(console, "Full video")
            # The edge's video pulse reaches the console beside the device's and the ECG's.
            await eventually(
                lambda: console.evaluate(
                    f"(() => {{ const p = window.telehealth.patients.get('{sid}'); return p && p.rppg && p.rppg.value; }})()"
                ),
                60,
                "a video pulse (rPPG) in the console",
            )
            rppg = await console.evaluate(f"window.telehealth.patients.get('{sid}').rppg.value")
            assert abs(rppg - 75.0) <= 5.0, rppg
            await console.wait_for_function(
                "[...document.querySelectorAll('#p-values div')].some((d) => "
                "d.textContent.startsWith('Pulse (video)') && /\\d/.test(d.querySelector('dd').textContent))"
            )
            assert "fps" in (await console.text_content("#q-patient") or "")
            await page.screenshot(path=str(SCREENSHOTS / "patient-page.png"), full_page=True)
            await console.screenshot(path=str(SCREENSHOTS / "console-patient.png"))

            # A lossy uplink from the patient (RTP dropped at the edge's socket): the call steps
            # down, the console's label says so, the page sends less, and it all comes back.
            call = edge.media.calls.calls[sid]
            assert call.patient is not None
            link = LossyUplink(call.patient.pc)
            link.loss = 0.10
            await label(console, "Reduced video")
            await eventually(
                lambda: page.evaluate("window.telehealth.sendMode === 'CALL_MODE_REDUCED'"),
                10,
                "the patient page sends reduced video",
            )
            link.loss = 0.35
            await label(console, "Audio only")
            await eventually(
                lambda: page.evaluate("window.telehealth.sendMode === 'CALL_MODE_AUDIO_ONLY'"),
                10,
                "the patient page stops sending video",
            )
            assert "audio only" in (await console.text_content("#p-banner") or "")
            await console.screenshot(path=str(SCREENSHOTS / "console-audio-only.png"))
            link.loss = 0.0
            await label(console, "Reduced video")
            await label(console, "Full video")
            assert link.dropped > 50

            await console.click("#hangup")
            await page.click("#leave")
            await eventually(lambda: edge.media.calls.peer_count == 0, 20, "edge closed both peers")
        finally:
            await clinician.close()
            await patient.close()
    for name in (
        "console-ward.png",
        "console-patient.png",
        "patient-page.png",
        "console-audio-only.png",
    ):
        assert (SCREENSHOTS / name).stat().st_size > 10_000
    shutil.rmtree(tmp_path / "profile-clinician", ignore_errors=True)
    shutil.rmtree(tmp_path / "profile-patient", ignore_errors=True)


async def sign_in(console: Any, core: CoreServer, user: str) -> None:
    await console.goto(core.http.url + "/console")
    await console.wait_for_url("**/login?next=/console")
    await console.fill("#user", user)
    await console.fill("#password", PASSWORD)
    await console.click("#sign-in")
    await console.wait_for_url("**/console")


async def test_a_moved_session_brings_the_patient_page_and_the_console_along(
    core: CoreServer, edge_factory: EdgeFactory, tmp_path: Path
) -> None:
    edges = {
        "edge-a": await edge_factory("edge-a", media_udp_port_min=41270, media_udp_port_max=41301),
        "edge-b": await edge_factory("edge-b", media_udp_port_min=41310, media_udp_port_max=41341),
    }
    await core.security.users.add_user("dr-move", "clinician", PASSWORD)
    await core.security.users.assign("dr-move", "patient-077")
    agent = DeviceAgent(DeviceConfig(core.address, "patient-077", "zone-a"))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    face = looping_face(tmp_path)
    try:
        await eventually(lambda: agent.session_id, 10, "device opened its session")
        sid = agent.session_id
        first = (await core.directory.get(sid)).edge_id
        async with playwright_api.async_playwright() as pw:
            clinician = await launch(pw, tmp_path, "clinician", [])
            patient = await launch(
                pw, tmp_path, "patient", [f"--use-file-for-fake-video-capture={face}"]
            )
            try:
                console = await clinician.new_page()
                await sign_in(console, core, "dr-move")
                await console.wait_for_selector(f'tr[data-session="{sid}"]', timeout=20_000)
                await console.click(f'tr[data-session="{sid}"]')
                await console.click("#invite")
                link = await eventually(
                    lambda: console.evaluate("window.telehealth.inviteLink"), 10, "invite link"
                )
                page = await patient.new_page()
                await page.goto(link + "&autojoin=1")
                await page.wait_for_url(edges[first].media.http_url + "/patient#**")
                await eventually(
                    lambda: page.evaluate("window.telehealth.connected"), 30, "patient in"
                )
                await console.click("#call")
                await frames_grow(console, "clinician sees the patient")
                await frames_grow(page, "patient sees the clinician")
                seen = f"window.telehealth.patients.get('{sid}')"
                before = await console.evaluate(f"{seen}.lastSeq")

                # The core moves the session (a drain of its edge), make-before-break.
                _, moved = await core.directory.relocate(sid, "drain")
                assert moved
                second = (await core.directory.get(sid)).edge_id
                assert second != first
                new = edges[second].media.http_url
                # The patient page comes back through the core's /join by itself, at the new
                # edge, and joins the call again; the console follows with its view and call.
                await page.wait_for_url(new + "/patient#**", timeout=30_000)
                await eventually(
                    lambda: page.evaluate("window.telehealth.connected"), 30, "patient back in"
                )
                await eventually(
                    lambda: console.evaluate(f"{seen}.edgeHttp === {new!r}"),
                    30,
                    "the console's vitals view on the new edge",
                )
                await eventually(
                    lambda: console.evaluate(
                        f"window.telehealth.connected && {seen}.ws && {seen}.ws.url.startsWith({new.replace('http', 'ws')!r})"
                    ),
                    30,
                    "the console's call and view at the new edge",
                )
                await frames_grow(console, "clinician sees the patient again")
                await frames_grow(page, "patient sees the clinician again")
                # The view resumed: readings go on past those seen before the move.
                await eventually(
                    lambda: console.evaluate(f"{seen}.lastSeq > {before} + 10"),
                    20,
                    "vitals continue",
                )
                assert await console.evaluate("window.telehealth.moves >= 1")
                assert edges[second].media.calls.peer_count == 2
                await eventually(
                    lambda: edges[first].media.calls.peer_count == 0, 30, "old edge let go"
                )
                await console.click("#hangup")
                await page.click("#leave")
                await eventually(
                    lambda: edges[second].media.calls.peer_count == 0, 20, "call ended"
                )
            finally:
                await clinician.close()
                await patient.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


async def test_the_console_fills_a_hole_in_its_view_from_the_archive(
    core: CoreServer, device: DeviceAgent, tmp_path: Path
) -> None:
    """The edge's view can have holes (a move to an edge that does not hold what came before,
    a view that fell behind): the console reads those readings from the core's archive, so
    the trends have no gap. Here the link between browser and edge loses every batch for a
    while (Playwright sits on the WebSocket); afterwards the console has filled exactly the
    batches it lost, in order, and the read is in the audit log."""
    sid = device.session_id
    assert sid
    lost: list[int] = []
    losing = {"on": False}

    def lossy(ws: Any) -> None:
        server = ws.connect_to_server()

        def down(message: str | bytes) -> None:
            if losing["on"] and isinstance(message, str):
                msg = json.loads(message)
                if msg.get("type") == "batch":
                    lost.append(int(msg["batch"]["seq"]))
                    return
            ws.send(message)

        server.on_message(down)

    async with playwright_api.async_playwright() as pw:
        clinician = await launch(pw, tmp_path, "clinician", [])
        try:
            console = await clinician.new_page()
            await console.route_web_socket("**/media/ws", lossy)
            await sign_in(console, core, CLINICIAN)
            # The ward row: the page has settled (sign-in's redirects are over).
            await console.wait_for_selector(f'tr[data-session="{sid}"]', timeout=20_000)
            seen = f"window.telehealth.patients.get('{sid}')"
            await eventually(
                lambda: console.evaluate(f"!!{seen} && {seen}.lastSeq > 10"),
                30,
                "live view",
            )
            losing["on"] = True
            await eventually(lambda: len(lost) >= 60, 30, "batches lost on the way")
            losing["on"] = False
            await eventually(
                lambda: console.evaluate(f"{seen}.lastSeq > {max(lost)}"), 20, "live again"
            )
            try:
                await eventually(
                    lambda: console.evaluate(f"(window.telehealth.filled || 0) >= {len(lost)}"),
                    30,
                    "the hole filled from the archive",
                )
            except AssertionError as e:
                got = await console.evaluate(
                    "[window.telehealth.filled, window.telehealth.unfilled]"
                )
                raise AssertionError(f"{e}: lost {lost}, filled and unfilled {got}") from None
            assert await console.evaluate("window.telehealth.filled") == len(lost)
            assert lost == list(range(lost[0], lost[-1] + 1))
            # The filled readings sit inside the trend, in time order.
            assert await console.evaluate(
                f"{seen}.trends.hr.every((x, i, a) => i === 0 || a[i - 1][0] <= x[0])"
            )
            assert not await console.evaluate("window.telehealth.unfilled")
        finally:
            await clinician.close()
    reads = {
        (e.event.subject, e.event.outcome)
        async for e in core.security.audit.entries()
        if e.event.action == "archive.query" and e.event.session_id == sid
    }
    assert reads == {(CLINICIAN, "allowed")}
