"""Operator actions on the cluster behind the mesh: cordon or uncordon the nodes of a zone."""

from __future__ import annotations

import logging

from kubernetes import config
from kubernetes.client import CoreV1Api

log = logging.getLogger(__name__)

ZONE_LABEL = "topology.kubernetes.io/zone"


def cordon_zone_nodes(
    zone: str,
    kubeconfig: str | None,
    cordon: bool = True,
    *,
    api: CoreV1Api | None = None,
) -> list[str]:
    """Mark every node labelled with `zone` unschedulable (or schedulable again).

    Returns the names of the nodes patched, sorted; an empty list means no node
    carries the zone label. kubeconfig None means the default ($KUBECONFIG or
    ~/.kube/config). Running pods stay: draining sessions is the mesh's job.
    """
    if not zone:
        raise ValueError("zone must not be empty")
    if api is None:
        api = CoreV1Api(config.new_client_from_config(kubeconfig))  # type: ignore[no-untyped-call]
    core = api
    nodes = core.list_node(label_selector=f"{ZONE_LABEL}={zone}")
    names = sorted(n.metadata.name for n in nodes.items if n.metadata and n.metadata.name)
    for name in names:
        core.patch_node(name, {"spec": {"unschedulable": cordon}})
    log.info(
        "zone nodes cordoned" if cordon else "zone nodes uncordoned",
        extra={"zone": zone, "nodes": len(names)},
    )
    return names
