"""The core's Kubernetes side end to end: discovery events into the real edge registry, and
`telehealth-ctl drain --cordon` against the Kubernetes API paths clients/kube.py uses.

No Kubernetes API server runs here. Discovery reads EndpointSlices through the fake API of
tests/unit/test_discovery.py (the client's own models and real `kubernetes.watch.Watch`);
the cordon goes over HTTP to tests/integration/kube_api.py, a loopback server speaking the
node paths. Core, edges, placement and the CLI are the real ones.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import grpc
import pytest
from kubernetes.client import DiscoveryV1Api, V1EndpointSlice

from clients import ctl
from core_services.edges.discovery import DiscoveredEdge, EndpointSliceDiscovery
from core_services.server import CoreServer
from core_services.sessions.domain import EdgeState
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff
from tests.integration.kube_api import serve_kube_api
from tests.unit.test_discovery import NS, SERVICE, FakeApiServer, endpoint, endpoint_slice


async def open_in_zone_a(core: CoreServer, channel_to: Callable[[str], grpc.aio.Channel]) -> str:
    """Open a session for a device in zone-a; the edge placement chose."""
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    opened = await stub.Open(
        sessions_pb2.OpenSessionRequest(patient_id=f"p-{uuid.uuid4().hex[:8]}", zone="zone-a"),
        timeout=10,
    )
    return str(opened.assignment.edge_id)


@pytest.fixture
async def watched(core: CoreServer) -> AsyncIterator[FakeApiServer]:
    """The core's registry fed by a real EndpointSliceDiscovery over the fake API, wired as
    CoreServer wires it in a cluster (each edge set goes to EdgeRegistry.apply_discovery)."""
    api = FakeApiServer()
    discovery = EndpointSliceDiscovery(
        NS, SERVICE, cast(DiscoveryV1Api, api), backoff_initial_s=0.01, backoff_max_s=0.05
    )

    async def on_change(found: list[DiscoveredEdge]) -> None:
        await core.edges.apply_discovery(found)

    # edge-b is in Kubernetes from the start; edge-a's pod is not listed yet.
    api.change(
        "ADDED", endpoint_slice("slice-b", [endpoint("edge-b", "10.0.1.1", "zone-b")]), False
    )
    task = asyncio.create_task(discovery.run(on_change))
    yield api
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    api.shutdown()


async def test_discovery_events_make_edges_placeable_dead_back_and_gone(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: Callable[[str], grpc.aio.Channel],
    watched: FakeApiServer,
) -> None:
    await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")

    def state() -> EdgeState:
        return core.edges.edges["edge-a"].state

    def slice_a(ready: bool) -> V1EndpointSlice:
        return endpoint_slice("slice-a", [endpoint("edge-a", "10.0.0.1", "zone-a", ready)])

    # Heartbeating but not (yet) an endpoint of the edge Service: not trusted with sessions.
    await eventually(lambda: state() is EdgeState.DEAD, what="edge-a unknown to Kubernetes")
    assert await open_in_zone_a(core, channel_to) == "edge-b"

    # add: the pod's endpoint appears, ready.
    watched.change("ADDED", slice_a(True))
    await eventually(lambda: state() is EdgeState.HEALTHY, what="edge-a added")
    assert await open_in_zone_a(core, channel_to) == "edge-a"

    # not ready (failing readiness probe): dead at once, its sessions re-placed.
    watched.change("MODIFIED", slice_a(False))
    await eventually(lambda: state() is EdgeState.DEAD, what="edge-a not ready")
    assert await open_in_zone_a(core, channel_to) == "edge-b"

    # ready again (the edge kept reconnecting its heartbeat stream): back, and placeable.
    watched.change("MODIFIED", slice_a(True))
    await eventually(lambda: state() is EdgeState.HEALTHY, what="edge-a ready again")
    assert await open_in_zone_a(core, channel_to) == "edge-a"

    # delete (pod gone): dead, nothing placed on it.
    watched.change("DELETED", slice_a(True))
    await eventually(lambda: state() is EdgeState.DEAD, what="edge-a deleted")
    assert await open_in_zone_a(core, channel_to) == "edge-b"
    assert core.edges.edges["edge-b"].state is EdgeState.HEALTHY


def edge_state(core: CoreServer, edge_id: str) -> EdgeState:
    return core.edges.edges[edge_id].state


def _node(name: str, zone: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {},
    }


async def test_drain_cordon_marks_the_zones_nodes_unschedulable_and_undo_reverts(
    core: CoreServer,
    edge_factory: EdgeFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await edge_factory("edge-a", "zone-a")
    ((_, bearer_value),) = await staff(core, "operator")
    monkeypatch.setenv("TELEHEALTH_TOKEN", bearer_value.removeprefix("Bearer "))

    with serve_kube_api(tmp_path) as (api, kubeconfig):
        for name, zone in (("kind-worker", "zone-a"), ("kind-worker2", "zone-b")):
            api.put("/api/v1", "nodes", _node(name, zone))
        api.put("/api/v1", "nodes", _node("kind-worker3", "zone-a"))

        def unschedulable() -> dict[str, bool]:
            return {
                n: bool(api.get("/api/v1", "nodes", n)["spec"].get("unschedulable"))
                for n in ("kind-worker", "kind-worker2", "kind-worker3")
            }

        async def run_ctl(*args: str) -> tuple[int, str]:
            out = io.StringIO()
            argv = ["--core", core.address, "drain", "edge-a", *args]
            # ctl's main runs its own event loop, as from a shell; give it a thread.
            code = await asyncio.to_thread(ctl.main, argv, out)
            return code, out.getvalue()

        code, text = await run_ctl("--cordon", "--kubeconfig", str(kubeconfig))
        assert code == 0, text
        assert "cordoned node(s) of zone-a: kind-worker, kind-worker3" in text
        assert unschedulable() == {"kind-worker": True, "kind-worker2": False, "kind-worker3": True}
        assert edge_state(core, "edge-a") is EdgeState.DRAINING
        patched = [p for m, p in api.requests if m == "PATCH"]
        assert patched == ["/api/v1/nodes/kind-worker", "/api/v1/nodes/kind-worker3"]

        code, text = await run_ctl("--undo", "--cordon", "--kubeconfig", str(kubeconfig))
        assert code == 0, text
        assert "uncordoned node(s) of zone-a" in text
        assert unschedulable() == {
            n: False for n in ("kind-worker", "kind-worker2", "kind-worker3")
        }
        assert edge_state(core, "edge-a") is EdgeState.HEALTHY


async def test_probe_dials_the_pod_address_discovery_knows_not_the_advertised_one(
    core: CoreServer, edge_factory: EdgeFactory, watched: FakeApiServer
) -> None:
    # In kind the edge advertises a node port on the host (here: a port nothing listens
    # on), which the core's pod cannot reach; Kubernetes knows the pod's own address.
    edge = await edge_factory("edge-a", "zone-a", advertise_address="127.0.0.1:1")
    port = edge.grpc.port
    watched.change(
        "ADDED",
        endpoint_slice("slice-a", [endpoint("edge-a", "127.0.0.1", "zone-a")], port=port),
    )
    await eventually(
        lambda: edge_state(core, "edge-a") is EdgeState.HEALTHY, what="edge-a discovered"
    )
    assert core.edges.edges["edge-a"].address == "127.0.0.1:1"
    # A client reporting edge-a unreachable makes the core probe it: alive, so kept.
    assert await core.edges.probe("edge-a", timeout_s=5)
