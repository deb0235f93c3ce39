"""Edge discovery from the EndpointSlices of the edge Service: list, watch, resume on 410 Gone."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import client, config, watch
from kubernetes.client import DiscoveryV1Api, V1EndpointSlice
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

# The EndpointSlice controller labels every slice with the Service it belongs to.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
HTTP_GONE = 410


@dataclass(frozen=True)
class DiscoveredEdge:
    """One edge pod behind the edge Service, as Kubernetes sees it."""

    edge_id: str
    zone: str
    address: str
    ready: bool


class WatchStream(Protocol):
    """The part of `kubernetes.watch.Watch` the watcher uses (replaceable in tests)."""

    def stream(
        self, func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Iterator[Mapping[str, Any]]: ...

    def stop(self) -> None: ...


def _host_port(address: str, port: int) -> str:
    # IPv6 literals need brackets to be dialled as host:port.
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def edges_from_slices(
    slices: Iterable[V1EndpointSlice], port_name: str = "grpc"
) -> list[DiscoveredEdge]:
    """The edges named by a Service's slices; an endpoint in several slices counts once.

    Slices without the named port are ignored (they cannot be dialled). While the
    controller moves an endpoint between slices it may appear twice: a ready copy wins.
    """
    found: dict[str, DiscoveredEdge] = {}
    for sl in slices:
        port = next((p.port for p in sl.ports or [] if p.name == port_name and p.port), None)
        if port is None:
            continue
        for ep in sl.endpoints or []:
            if not ep.addresses:
                continue
            address = _host_port(ep.addresses[0], port)
            target = ep.target_ref.name if ep.target_ref is not None else None
            edge_id = target or ep.hostname or address
            # The API says a missing ready condition means "unknown", to be read as ready.
            ready = ep.conditions is None or ep.conditions.ready is not False
            edge = DiscoveredEdge(edge_id=edge_id, zone=ep.zone or "", address=address, ready=ready)
            prev = found.get(edge_id)
            if prev is None or (edge.ready and not prev.ready):
                found[edge_id] = edge
    return sorted(found.values(), key=lambda e: (e.zone, e.edge_id))


def in_cluster_api() -> DiscoveryV1Api:
    """A DiscoveryV1Api authenticated with the pod's ServiceAccount (no global client config)."""
    cfg = client.Configuration()
    config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return DiscoveryV1Api(client.ApiClient(cfg))


class EndpointSliceDiscovery:
    """Watches the slices of one Service and reports the full edge set on every change.

    The official client is synchronous, so list+watch runs in a daemon thread and each
    new edge set is handed to the event loop with call_soon_threadsafe.
    """

    def __init__(
        self,
        namespace: str,
        service_name: str,
        api: DiscoveryV1Api,
        port_name: str = "grpc",
        *,
        watch_factory: Callable[[], WatchStream] = watch.Watch,
        watch_timeout_s: int = 300,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.namespace = namespace
        self.service_name = service_name
        self.port_name = port_name
        self._api = api
        self._watch_factory = watch_factory
        self._watch_timeout_s = watch_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stopping = threading.Event()
        self._watch_lock = threading.Lock()
        self._watch: WatchStream | None = None
        self.relists = 0  # how many times the full list was fetched (first one included)

    @property
    def _selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.service_name}"

    async def run(self, on_change: Callable[[list[DiscoveredEdge]], Awaitable[None]]) -> None:
        """Call on_change with the whole edge set after the first list and after each change.

        Runs until cancelled. Identical consecutive sets are reported once.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[list[DiscoveredEdge]] = asyncio.Queue()
        self._stopping.clear()

        def emit(edges: list[DiscoveredEdge]) -> None:
            if self._stopping.is_set():
                return
            try:
                loop.call_soon_threadsafe(updates.put_nowait, edges)
            except RuntimeError:  # loop closed while the thread was reading
                self._stopping.set()

        worker = threading.Thread(
            target=self._sync_loop,
            args=(emit,),
            name=f"endpointslice-watch-{self.service_name}",
            daemon=True,
        )
        worker.start()
        try:
            last: list[DiscoveredEdge] | None = None
            while True:
                edges = await updates.get()
                if edges != last:
                    last = edges
                    await on_change(edges)
        finally:
            self.stop()

    def stop(self) -> None:
        """Ask the worker thread to end; a blocked watch read ends at the server timeout."""
        self._stopping.set()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.stop()

    def _sync_loop(self, emit: Callable[[list[DiscoveredEdge]], None]) -> None:
        delay = self._backoff_initial_s
        while not self._stopping.is_set():
            try:
                self._list_and_watch(emit)
                delay = self._backoff_initial_s
            except ApiException as e:
                if e.status == HTTP_GONE:
                    # Our resourceVersion fell out of the server's window: list afresh.
                    log.info(
                        "endpointslice watch expired; listing again",
                        extra={"service": self.service_name, "namespace": self.namespace},
                    )
                    continue
                log.warning(
                    "endpointslice API error; retrying",
                    extra={
                        "service": self.service_name,
                        "namespace": self.namespace,
                        "status": e.status,
                        "reason": e.reason,
                        "retry_in_s": delay,
                    },
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, self._backoff_max_s)
            except Exception as e:  # the thread must outlive network errors and bad data
                log.warning(
                    "endpointslice watch failed; retrying",
                    extra={
                        "service": self.service_name,
                        "namespace": self.namespace,
                        "error": type(e).__name__,
                        "retry_in_s": delay,
                    },
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, self._backoff_max_s)

    def _list_and_watch(self, emit: Callable[[list[DiscoveredEdge]], None]) -> None:
        listed = self._api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self._selector
        )
        self.relists += 1
        slices: dict[str, V1EndpointSlice] = {
            sl.metadata.name: sl for sl in listed.items if sl.metadata and sl.metadata.name
        }
        version = listed.metadata.resource_version if listed.metadata else None
        edges = edges_from_slices(slices.values(), self.port_name)
        log.info(
            "endpointslices listed",
            extra={
                "service": self.service_name,
                "slices": len(slices),
                "edges": len(edges),
                "ready": sum(e.ready for e in edges),
            },
        )
        emit(edges)
        while not self._stopping.is_set():
            w = self._watch_factory()
            with self._watch_lock:
                self._watch = w
            kwargs: dict[str, Any] = {
                "label_selector": self._selector,
                "timeout_seconds": self._watch_timeout_s,
                "allow_watch_bookmarks": True,
            }
            if version:
                kwargs["resource_version"] = version
            try:
                for event in w.stream(
                    self._api.list_namespaced_endpoint_slice, self.namespace, **kwargs
                ):
                    if self._stopping.is_set():
                        return
                    version = self._apply(event, slices) or version
                    if event.get("type") != "BOOKMARK":
                        emit(edges_from_slices(slices.values(), self.port_name))
            finally:
                with self._watch_lock:
                    self._watch = None
            # The server closed the watch at timeout_seconds: resume from where we were.

    def _apply(self, event: Mapping[str, Any], slices: dict[str, V1EndpointSlice]) -> str | None:
        """Fold one watch event into the slice map; return the resourceVersion it carries."""
        kind = event.get("type")
        obj = event.get("object")
        if kind == "BOOKMARK":
            raw = event.get("raw_object")
            meta = raw.get("metadata") if isinstance(raw, Mapping) else None
            rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
            return str(rv) if rv else None
        if not isinstance(obj, V1EndpointSlice) or obj.metadata is None or not obj.metadata.name:
            log.warning("unexpected endpointslice watch event", extra={"event_type": kind})
            return None
        name = obj.metadata.name
        if kind in ("ADDED", "MODIFIED"):
            slices[name] = obj
        elif kind == "DELETED":
            slices.pop(name, None)
        log.debug("endpointslice event", extra={"event_type": kind, "slice": name})
        return obj.metadata.resource_version
