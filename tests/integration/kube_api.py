"""A loopback HTTP server speaking the few Kubernetes API paths the chart and the CLI use.

No Kubernetes API server runs on these machines (no container engine either), so the tests
that need one talk to this: `helm template --dry-run=server` for the chart's `lookup` calls,
and `telehealth-ctl drain --cordon` (clients/kube.py through the official client) for nodes.
It serves the real URL layout and JSON shapes (discovery documents, objects, lists with a
label selector, Status errors, merge patches) over real HTTP; what it does not implement
(watch, field selectors, admission) no caller here uses.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

# (API path prefix, resource) -> (kind, namespaced). The discovery documents list these.
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("/api/v1", "secrets"): ("Secret", True),
    ("/api/v1", "nodes"): ("Node", False),
    ("/api/v1", "services"): ("Service", True),
    ("/apis/discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", True),
}


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what a strategic merge does for the scalar fields used here)."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeApi:
    """The object store and request log behind the HTTP handler."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str, str, str], Obj] = {}
        self.requests: list[tuple[str, str]] = []
        self.version = 1

    def put(self, prefix: str, resource: str, obj: Obj) -> None:
        """Store an object as if it had been created (namespace "" for cluster-scoped)."""
        meta = obj.setdefault("metadata", {})
        with self.lock:
            self.version += 1
            meta["resourceVersion"] = str(self.version)
            key = (prefix, resource, meta.get("namespace", ""), meta["name"])
            self.objects[key] = obj

    def get(self, prefix: str, resource: str, name: str, namespace: str = "") -> Obj:
        with self.lock:
            return self.objects[(prefix, resource, namespace, name)]

    def handle(self, method: str, url: str, body: bytes) -> tuple[int, Obj]:
        parts = urlsplit(url)
        path, query = parts.path.rstrip("/"), parse_qs(parts.query)
        with self.lock:
            self.requests.append((method, path))
        if path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return 200, {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": "discovery.k8s.io",
                        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                        "preferredVersion": {
                            "groupVersion": "discovery.k8s.io/v1",
                            "version": "v1",
                        },
                    }
                ],
            }
        for prefix in {p for p, _ in RESOURCES}:
            if path == prefix:
                return 200, self._resource_list(prefix)
            if path.startswith(prefix + "/"):
                return self._object_call(method, prefix, path[len(prefix) + 1 :], query, body)
        return self._status(404, "NotFound", f"the server could not find {path}")

    def _resource_list(self, prefix: str) -> Obj:
        return {
            "kind": "APIResourceList",
            "groupVersion": prefix.removeprefix("/apis/").removeprefix("/api/") or "v1",
            "resources": [
                {
                    "name": resource,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["get", "list", "patch"],
                }
                for (p, resource), (kind, namespaced) in RESOURCES.items()
                if p == prefix
            ],
        }

    def _object_call(
        self, method: str, prefix: str, rest: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, Obj]:
        segs = rest.split("/")
        namespace = ""
        if len(segs) >= 2 and segs[0] == "namespaces":
            namespace, segs = segs[1], segs[2:]
        if not segs or (prefix, segs[0]) not in RESOURCES:
            return self._status(404, "NotFound", f"no resource {rest!r}")
        resource, kind = segs[0], RESOURCES[(prefix, segs[0])][0]
        if len(segs) == 1 and method == "GET":
            selector = query.get("labelSelector", [""])[0]
            with self.lock:
                items = [
                    o
                    for (p, r, ns, _), o in sorted(self.objects.items())
                    if p == prefix
                    and r == resource
                    and ns == namespace
                    and _matches(o["metadata"].get("labels", {}), selector)
                ]
                version = str(self.version)
            return 200, {
                "kind": f"{kind}List",
                "apiVersion": "v1" if prefix == "/api/v1" else prefix.removeprefix("/apis/"),
                "metadata": {"resourceVersion": version},
                "items": items,
            }
        if len(segs) != 2:
            return self._status(405, "MethodNotAllowed", f"{method} {rest} is not served here")
        key = (prefix, resource, namespace, segs[1])
        with self.lock:
            found = self.objects.get(key)
            if found is None:
                return self._status(404, "NotFound", f'{resource} "{segs[1]}" not found')
            if method == "GET":
                return 200, found
            if method == "PATCH":
                patched = _merge(found, json.loads(body or b"{}"))
                self.version += 1
                patched["metadata"]["resourceVersion"] = str(self.version)
                self.objects[key] = patched
                return 200, patched
        return self._status(405, "MethodNotAllowed", f"{method} is not served here")

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, Obj]:
        return code, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }


@contextmanager
def serve_kube_api(directory: Path) -> Iterator[tuple[FakeKubeApi, Path]]:
    """Run the fake API on a loopback port; yields it and a kubeconfig file that points at it."""
    api = FakeKubeApi()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            code, obj = api.handle(self.command, self.path, self.rfile.read(length))
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = _reply

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the request log is api.requests

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="fake-kube-api", daemon=True)
    thread.start()
    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"},
                    }
                ],
                "users": [{"name": "operator", "user": {"token": "not-checked"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "operator"}}],
                "current-context": "fake",
            }
        )
    )
    try:
        yield api, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
