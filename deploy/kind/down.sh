#!/usr/bin/env bash
# Removes the kind cluster made by up.sh (and with it every release in it).
set -euo pipefail

CLUSTER_NAME="${CLUSTER_NAME:-telehealth}"

if ! command -v kind >/dev/null 2>&1; then
    echo "down.sh: 'kind' is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)" >&2
    exit 1
fi
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    echo "==> no kind cluster named '$CLUSTER_NAME'; nothing to remove" >&2
    exit 0
fi
echo "==> deleting kind cluster '$CLUSTER_NAME'" >&2
kind delete cluster --name "$CLUSTER_NAME"
