"""Writes the chart's core.config / edge.config schemas from the services' settings classes.

Every setting of CoreSettings and EdgeSettings (telehealth/config.py) is either settable
through the chart (core.config, edge.config, zones[].config), set by the chart itself, or
listed below as making no sense in a cluster. tests/integration/test_helm_chart.py fails
when values.schema.json and the settings classes disagree; then run

    .venv/bin/python deploy/helm/settings_schema.py

and describe the new values in the chart README if the chart sets them. Hand-written
rather than a library: the step is small (pydantic's own JSON schema, minus what draft-07
and Helm do not need, plus the validators' enums pydantic cannot see).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "deploy" / "helm" / "telehealth-mesh" / "values.schema.json"

# Set by the chart from its own values or objects; a core.config/edge.config key would
# fight the chart (and the ConfigMap gives the chart's value precedence anyway).
CORE_CHART_OWNED: dict[str, str] = {
    "grpc_listen": "0.0.0.0:core.grpcPort",
    "http_listen": "0.0.0.0:core.httpPort",
    "data_dir": "the data volume (PVC or emptyDir) at /var/lib/telehealth",
    "discovery": "core.discovery",
    "kubernetes_namespace": "the release namespace",
    "kubernetes_edge_service": "the chart's headless edge Service",
    "cluster": "true exactly when externalPostgresql.enabled",
    "keys_dir": "the token keys Secret's mount (core.tokenKeys)",
    "database_url": "externalPostgresql.existingSecret, as TELEHEALTH_DATABASE_URL",
    "tls_cert_file": "tls.* (the component's certificate mount)",
    "tls_key_file": "tls.*",
    "tls_ca_file": "tls.*",
    "http_tls_cert_file": "tls.https (the component's certificate mount)",
    "http_tls_key_file": "tls.https",
    "bootstrap_users_file": "the bootstrap Secret's mount (core.bootstrapUsers)",
}
EDGE_CHART_OWNED: dict[str, str] = {
    "edge_id": "the pod name",
    "zone": "zones[].name",
    "grpc_listen": "0.0.0.0:edge.grpcPort",
    "http_listen": "0.0.0.0:edge.httpPort",
    "advertise_address": "edge.advertise / zones[].advertiseAddress",
    "http_advertise_url": "edge.advertise / zones[].httpAdvertiseUrl",
    "media_advertise_address": "edge.advertise / zones[].mediaAdvertiseAddress",
    "media_udp_port_min": "zones[].mediaUdpPortRange / media.udpPortRange",
    "media_udp_port_max": "zones[].mediaUdpPortRange / media.udpPortRange",
    "core_address": "the core Service",
    "data_dir": "the data volume at /var/lib/telehealth",
    "tls_server_name": "the zone Service's DNS name (with tls.enabled)",
    "tls_cert_file": "tls.*",
    "tls_key_file": "tls.*",
    "tls_ca_file": "tls.*",
    "http_tls_cert_file": "tls.https (the component's certificate mount)",
    "http_tls_key_file": "tls.https",
    "turn_urls": "turn.urls, else the chart's coturn Service",
    "turn_secret": "the TURN Secret (turn.existingSecret or the chart's), as TELEHEALTH_TURN_SECRET",
}
# Settings that make no sense in a cluster: paths to files the chart has no way to mount
# (and whose defaults already sit on the right volume).
CORE_NOT_IN_A_CLUSTER: dict[str, str] = {
    # Defaults to keys_dir/audit.key, which the chart's keys Secret (or the data volume) holds.
    "audit_key_file": "a path; the chart provides keys_dir/audit.key",
    # Defaults to data_dir/audit-checkpoints.jsonl, on the data volume.
    "audit_checkpoint_file": "a path; the default is on the data volume",
}
EDGE_NOT_IN_A_CLUSTER: dict[str, str] = {}

# What the field validators accept, which pydantic's schema does not show.
ENUMS: dict[str, list[str]] = {
    "log_level": ["DEBUG", "INFO", "WARNING", "ERROR"],
    "log_format": ["json", "text"],
}
DROP = {"default", "title", "format"}


def _draft7(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _draft7(v) for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [_draft7(v) for v in node]
    return node


def config_properties(model: type[BaseModel], skip: set[str]) -> dict[str, Any]:
    """The JSON schema (draft-07) of each setting of `model` a chart user may set."""
    props: dict[str, Any] = {}
    for name, prop in model.model_json_schema()["properties"].items():
        if name in skip:
            continue
        out = _draft7(prop)
        if name in ENUMS:
            out["enum"] = ENUMS[name]
        if "description" in prop:
            out["description"] = prop["description"]  # last, for reading
        props[name] = out
    return props


def expected_config_schemas() -> dict[str, dict[str, Any]]:
    from telehealth.config import CoreSettings, EdgeSettings

    core = config_properties(CoreSettings, {*CORE_CHART_OWNED, *CORE_NOT_IN_A_CLUSTER})
    edge = config_properties(EdgeSettings, {*EDGE_CHART_OWNED, *EDGE_NOT_IN_A_CLUSTER})
    return {"core": core, "edge": edge, "zone": edge}


def config_nodes(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three config objects of values.schema.json, by what they configure."""
    p = schema["properties"]
    return {
        "core": p["core"]["properties"]["config"],
        "edge": p["edge"]["properties"]["config"],
        "zone": p["zones"]["items"]["properties"]["config"],
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))
    schema = json.loads(SCHEMA.read_text())
    for key, props in expected_config_schemas().items():
        node = config_nodes(schema)[key]
        node["properties"] = props
        node["additionalProperties"] = False
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote the settings schemas of {SCHEMA.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
