"""A load run longer than a session token: the generator renews publisher tokens in-band
and resubscribes viewers after the edge ends an expired view, as the device agent and a
clinician's viewer do. Without that, a 30-minute soak stopped at the 15-minute mark."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core_services.server import CoreServer
from loadtest.generator import GeneratorSpec, StepSpec, run
from tests.conftest import EdgeFactory, core_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TTL_S = 30  # the shortest token lifetime the core allows


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[CoreServer]:
    server = CoreServer(core_settings(tmp_path, token_ttl_s=TTL_S))
    await server.start()
    yield server
    await server.stop(grace=0)


async def test_a_run_outlasting_its_tokens_renews_them_and_loses_nothing(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    await edge_factory()
    spec = GeneratorSpec(
        label="edge",
        path="edge",
        target=core.address,
        batch_rate_hz=10.0,
        ecg_hz=250.0,
        vitals_rate_hz=1.0,
        # Past one lifetime: every publisher renews at two thirds of it, every viewer's
        # token (also TTL_S) expires on the edge and is renewed.
        steps=[StepSpec(patients=3, duration_s=TTL_S + 8)],
        viewers=1,
        watched=3,
        connections=1,
        viewer_key_dir=str(core.settings.resolved_keys_dir()),
        # The test core wants a clinician login for Attach as viewer, so viewer tokens are
        # minted: with the same short life, so the views do expire mid-run.
        viewer_token_ttl_s=TTL_S,
        progress="none",
    )
    out = await run(spec)
    step = out["steps"][0]
    assert out["stream_errors"] == {}, out["stream_errors"]
    # Three publishers renewed at least once; the views ended by expiry came back.
    assert out["token_renewals"] >= 3 + 3
    assert out["viewer_tokens"] == "minted" and out["viewer_token_renewals"] >= 3
    assert step["not_sent"] == 0
    assert step["delivered"] == step["sent"] == step["expected"]
    assert step["duplicates"] == 0
