"""EndpointSlice discovery against the kubernetes client's own models and its real Watch.

The fake API plays the API server: it keeps the slices, answers the list call with a
V1EndpointSliceList and answers the watch call with a streamed HTTP body of JSON watch
events, which the real `kubernetes.watch.Watch` decodes back into V1EndpointSlice models
(and turns an ERROR 410 event into ApiException, as against a real server).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest
from kubernetes.client import (
    ApiClient,
    CoreV1Api,
    DiscoveryV1Api,
    DiscoveryV1EndpointPort,
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1EndpointSliceList,
    V1ListMeta,
    V1Node,
    V1NodeList,
    V1ObjectMeta,
    V1ObjectReference,
)
from kubernetes.client.exceptions import ApiException

from clients.kube import cordon_zone_nodes
from core_services.edges.discovery import (
    DiscoveredEdge,
    EndpointSliceDiscovery,
    edges_from_slices,
)

NS = "telehealth"
SERVICE = "mesh-telehealth-mesh-edge"
DEADLINE_S = 5.0


def endpoint(
    pod: str | None,
    ip: str,
    zone: str | None = "zone-a",
    ready: bool | None = True,
    hostname: str | None = None,
) -> V1Endpoint:
    return V1Endpoint(
        addresses=[ip],
        conditions=V1EndpointConditions(ready=ready, serving=ready, terminating=False)
        if ready is not None
        else None,
        target_ref=V1ObjectReference(kind="Pod", name=pod, namespace=NS) if pod else None,
        hostname=hostname,
        zone=zone,
        node_name=f"node-{zone}",
    )


def endpoint_slice(
    name: str,
    endpoints: list[V1Endpoint],
    port_name: str = "grpc",
    port: int = 50061,
    address_type: str = "IPv4",
) -> V1EndpointSlice:
    return V1EndpointSlice(
        api_version="discovery.k8s.io/v1",
        kind="EndpointSlice",
        address_type=address_type,
        metadata=V1ObjectMeta(
            name=name, namespace=NS, labels={"kubernetes.io/service-name": SERVICE}
        ),
        endpoints=endpoints,
        ports=[DiscoveryV1EndpointPort(name=port_name, port=port, protocol="TCP")],
    )


class WatchBody:
    """A streamed watch response: what urllib3 hands the Watch for `_preload_content=False`."""

    status = 200

    def __init__(self) -> None:
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self.closed = threading.Event()

    def send(self, line: bytes) -> None:
        self._lines.put(line)

    def end(self) -> None:
        self._lines.put(None)

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        while not self.closed.is_set():
            try:
                line = self._lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                return
            yield line

    def close(self) -> None:
        self.closed.set()

    def release_conn(self) -> None:
        pass


class FakeApiServer:
    """Stands in for DiscoveryV1Api: the store of slices, resource versions, list and watch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.slices: dict[str, V1EndpointSlice] = {}
        self.version = 100
        self.list_calls: list[dict[str, Any]] = []
        self.watch_calls: list[dict[str, Any]] = []
        self.list_errors: list[ApiException] = []
        self.watch: WatchBody | None = None
        self.serializer = ApiClient()

    # Same name and return annotation as DiscoveryV1Api's, which is how Watch finds the model.
    def list_namespaced_endpoint_slice(self, namespace: str, **kwargs: Any) -> V1EndpointSliceList:
        assert namespace == NS
        assert kwargs["label_selector"] == f"kubernetes.io/service-name={SERVICE}"
        with self.lock:
            if kwargs.get("watch"):
                self.watch_calls.append(kwargs)
                self.watch = WatchBody()
                return cast(V1EndpointSliceList, self.watch)
            self.list_calls.append(kwargs)
            if self.list_errors:
                raise self.list_errors.pop(0)
            return V1EndpointSliceList(
                api_version="discovery.k8s.io/v1",
                kind="EndpointSliceList",
                items=list(self.slices.values()),
                metadata=V1ListMeta(resource_version=str(self.version)),
            )

    def _bump(self, sl: V1EndpointSlice) -> V1EndpointSlice:
        self.version += 1
        assert sl.metadata is not None
        sl.metadata.resource_version = str(self.version)
        return sl

    def change(self, kind: str, sl: V1EndpointSlice, notify: bool = True) -> None:
        """Apply a change to the store and, unless the watcher is meant to miss it, stream it."""
        with self.lock:
            sl = self._bump(sl)
            assert sl.metadata is not None and sl.metadata.name
            if kind == "DELETED":
                self.slices.pop(sl.metadata.name, None)
            else:
                self.slices[sl.metadata.name] = sl
            if notify:
                assert self.watch is not None, "no watch open"
                obj = self.serializer.sanitize_for_serialization(sl)  # type: ignore[no-untyped-call]
                self.watch.send(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def expire(self) -> None:
        """The API server's answer when the watched resourceVersion is too old."""
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version: 100 (140)",
            "reason": "Expired",
            "code": 410,
        }
        with self.lock:
            assert self.watch is not None
            self.watch.send(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")

    def bookmark(self) -> None:
        with self.lock:
            self.version += 1
            assert self.watch is not None
            obj = {
                "kind": "EndpointSlice",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)},
            }
            self.watch.send(json.dumps({"type": "BOOKMARK", "object": obj}).encode() + b"\n")

    def shutdown(self) -> None:
        with self.lock:
            if self.watch is not None:
                self.watch.end()


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[DiscoveredEdge]] = []

    async def __call__(self, edges: list[DiscoveredEdge]) -> None:
        self.calls.append(edges)

    @property
    def last(self) -> list[DiscoveredEdge] | None:
        return self.calls[-1] if self.calls else None


Running = tuple[FakeApiServer, Recorder, EndpointSliceDiscovery]


@pytest.fixture
def server() -> FakeApiServer:
    return FakeApiServer()


@pytest.fixture
async def running(server: FakeApiServer) -> AsyncIterator[Running]:
    discovery = EndpointSliceDiscovery(
        NS, SERVICE, cast(DiscoveryV1Api, server), backoff_initial_s=0.01, backoff_max_s=0.05
    )
    rec = Recorder()
    task = asyncio.create_task(discovery.run(rec))
    yield server, rec, discovery
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    server.shutdown()
    name = f"endpointslice-watch-{SERVICE}"
    await until(
        lambda: all(t.name != name for t in threading.enumerate()), "the watch thread to end"
    )


def test_edges_from_slices_reads_pod_zone_address_and_readiness() -> None:
    slices = [
        endpoint_slice(
            "edge-abc",
            [
                endpoint("edge-a-0", "10.1.0.5", "zone-a", True),
                endpoint("edge-b-0", "10.1.1.7", "zone-b", False),
                endpoint(None, "10.1.2.9", "zone-c", None, hostname="edge-c-0"),
            ],
        ),
        # During re-slicing an endpoint can sit in two slices: the ready copy wins.
        endpoint_slice("edge-dup", [endpoint("edge-b-0", "10.1.1.7", "zone-b", True)]),
        # A slice without the grpc port cannot be dialled and is ignored.
        endpoint_slice("edge-other", [endpoint("x", "10.9.9.9")], port_name="metrics"),
        endpoint_slice("edge-v6", [endpoint("edge-d-0", "fd00::7", "zone-d")], address_type="IPv6"),
    ]
    assert edges_from_slices(slices, "grpc") == [
        DiscoveredEdge("edge-a-0", "zone-a", "10.1.0.5:50061", True),
        DiscoveredEdge("edge-b-0", "zone-b", "10.1.1.7:50061", True),
        DiscoveredEdge("edge-c-0", "zone-c", "10.1.2.9:50061", True),
        DiscoveredEdge("edge-d-0", "zone-d", "[fd00::7]:50061", True),
    ]


def test_edges_from_slices_of_no_slices_is_empty() -> None:
    assert edges_from_slices([], "grpc") == []
    assert edges_from_slices([endpoint_slice("s", [])], "grpc") == []


async def test_first_list_reports_every_edge(server: FakeApiServer) -> None:
    server.change("ADDED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.1")]), notify=False)
    server.change(
        "ADDED",
        endpoint_slice("s2", [endpoint("edge-b-0", "10.0.0.2", "zone-b", False)]),
        notify=False,
    )
    discovery = EndpointSliceDiscovery(NS, SERVICE, cast(DiscoveryV1Api, server))
    rec = Recorder()
    task = asyncio.create_task(discovery.run(rec))
    try:
        await until(lambda: bool(rec.calls) and bool(server.watch_calls), "list then watch")
        assert rec.calls == [
            [
                DiscoveredEdge("edge-a-0", "zone-a", "10.0.0.1:50061", True),
                DiscoveredEdge("edge-b-0", "zone-b", "10.0.0.2:50061", False),
            ]
        ]
        # The watch starts from the list's resourceVersion, so nothing in between is lost.
        assert server.watch_calls[0]["resource_version"] == "102"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.shutdown()


async def test_watch_events_add_update_and_delete_edges(running: Running) -> None:
    server, rec, _ = running
    await until(lambda: server.watch is not None and rec.last == [], "empty first list")

    server.change("ADDED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.1")]))
    await until(
        lambda: rec.last == [DiscoveredEdge("edge-a-0", "zone-a", "10.0.0.1:50061", True)],
        "edge added",
    )

    server.change("MODIFIED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.1", ready=False)]))
    await until(
        lambda: rec.last == [DiscoveredEdge("edge-a-0", "zone-a", "10.0.0.1:50061", False)],
        "edge not ready",
    )

    # The pod came back with a new IP (restarted) and is ready again.
    server.change("MODIFIED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.9")]))
    await until(
        lambda: rec.last == [DiscoveredEdge("edge-a-0", "zone-a", "10.0.0.9:50061", True)],
        "edge ready at new address",
    )

    server.change("ADDED", endpoint_slice("s2", [endpoint("edge-b-0", "10.0.1.1", "zone-b")]))
    await until(lambda: rec.last is not None and len(rec.last) == 2, "second slice")

    server.change("DELETED", endpoint_slice("s1", []))
    await until(
        lambda: rec.last == [DiscoveredEdge("edge-b-0", "zone-b", "10.0.1.1:50061", True)],
        "edge deleted",
    )
    # Every distinct state was reported once, in order.
    assert len(rec.calls) == 6
    assert len(server.list_calls) == 1


async def test_bookmark_moves_resume_point_without_reporting(running: Running) -> None:
    server, rec, discovery = running
    await until(lambda: server.watch is not None and rec.last == [], "first list")
    server.bookmark()
    server.change("ADDED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.1")]))
    await until(lambda: rec.last is not None and len(rec.last) == 1, "edge after bookmark")
    assert rec.calls == [[], [DiscoveredEdge("edge-a-0", "zone-a", "10.0.0.1:50061", True)]]
    assert discovery.relists == 1


async def test_gone_410_mid_watch_relists_and_resumes(running: Running) -> None:
    server, rec, discovery = running
    server_first_watch = None
    await until(lambda: server.watch is not None and rec.last == [], "first list")
    server.change("ADDED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.1")]))
    await until(lambda: rec.last is not None and len(rec.last) == 1, "edge added")
    server_first_watch = server.watch

    # Changes the watcher never hears about (its watch fell too far behind)...
    server.change("DELETED", endpoint_slice("s1", []), notify=False)
    server.change(
        "ADDED", endpoint_slice("s2", [endpoint("edge-b-0", "10.0.1.1", "zone-b")]), notify=False
    )
    # ...then the server expires the watch.
    server.expire()

    await until(lambda: discovery.relists == 2, "a second list after 410 Gone")
    await until(
        lambda: rec.last == [DiscoveredEdge("edge-b-0", "zone-b", "10.0.1.1:50061", True)],
        "state from the re-list",
    )
    await until(lambda: server.watch is not server_first_watch, "a new watch")
    # The new watch resumes from the re-list's resourceVersion, not the expired one.
    assert server.watch_calls[-1]["resource_version"] == str(server.version)

    server.change("ADDED", endpoint_slice("s3", [endpoint("edge-c-0", "10.0.2.1", "zone-c")]))
    await until(lambda: rec.last is not None and len(rec.last) == 2, "events after resuming")
    assert [e.edge_id for e in rec.last or []] == ["edge-b-0", "edge-c-0"]


async def test_api_errors_back_off_and_recover(server: FakeApiServer) -> None:
    server.list_errors = [
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=403, reason="Forbidden"),
    ]
    server.change("ADDED", endpoint_slice("s1", [endpoint("edge-a-0", "10.0.0.1")]), notify=False)
    discovery = EndpointSliceDiscovery(
        NS, SERVICE, cast(DiscoveryV1Api, server), backoff_initial_s=0.01
    )
    rec = Recorder()
    task = asyncio.create_task(discovery.run(rec))
    try:
        await until(lambda: bool(rec.calls), "edges after the API recovers")
        assert len(server.list_calls) == 3
        assert rec.calls == [[DiscoveredEdge("edge-a-0", "zone-a", "10.0.0.1:50061", True)]]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.shutdown()


class FakeNodes:
    """CoreV1Api's list_node/patch_node over a fixed set of labelled nodes."""

    def __init__(self) -> None:
        self.nodes = {
            "kind-worker": "zone-a",
            "kind-worker2": "zone-b",
            "kind-worker3": "zone-a",
        }
        self.patches: list[tuple[str, dict[str, Any]]] = []

    def list_node(self, label_selector: str) -> V1NodeList:
        key, _, zone = label_selector.partition("=")
        assert key == "topology.kubernetes.io/zone"
        return V1NodeList(
            items=[
                V1Node(metadata=V1ObjectMeta(name=n, labels={key: z}))
                for n, z in self.nodes.items()
                if z == zone
            ]
        )

    def patch_node(self, name: str, body: dict[str, Any]) -> V1Node:
        self.patches.append((name, body))
        return V1Node(metadata=V1ObjectMeta(name=name))


def test_cordon_zone_nodes_patches_only_that_zone() -> None:
    api = FakeNodes()
    names = cordon_zone_nodes("zone-a", None, api=cast(CoreV1Api, api))
    assert names == ["kind-worker", "kind-worker3"]
    assert api.patches == [
        ("kind-worker", {"spec": {"unschedulable": True}}),
        ("kind-worker3", {"spec": {"unschedulable": True}}),
    ]
    api.patches.clear()
    assert cordon_zone_nodes("zone-b", None, cordon=False, api=cast(CoreV1Api, api)) == [
        "kind-worker2"
    ]
    assert api.patches == [("kind-worker2", {"spec": {"unschedulable": False}})]
    assert cordon_zone_nodes("zone-z", None, api=cast(CoreV1Api, api)) == []
