#!/usr/bin/env bash
# Brings up telehealth-mesh on a local kind cluster: cluster (one control plane, three
# zone workers), image build and load, optional Prometheus/Grafana, then the chart.
#
# Environment knobs:
#   CLUSTER_NAME   kind cluster name             (default: telehealth)
#   NAMESPACE      namespace of the release      (default: telehealth)
#   RELEASE        Helm release name             (default: telehealth)
#   IMAGE          image to build and load       (default: telehealth-mesh:dev)
#   KIND_NODE_IMAGE  kindest/node image to run   (default: kind's own)
#   MONITORING     1 installs kube-prometheus-stack for Grafana and alerts (default: 1)
#   HELM_ARGS      extra arguments for helm upgrade --install
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-telehealth}"
NAMESPACE="${NAMESPACE:-telehealth}"
RELEASE="${RELEASE:-telehealth}"
IMAGE="${IMAGE:-telehealth-mesh:dev}"
MONITORING="${MONITORING:-1}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
CHART="$ROOT/deploy/helm/telehealth-mesh"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'up.sh: %s\n' "$*" >&2; exit 1; }

# helm and kubectl may come from scripts/install_tools.sh (in .venv/bin).
PATH="$PATH:$ROOT/.venv/bin:$ROOT/.tools/bin"

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed. $2"
}
need docker "Install Docker (https://docs.docker.com/get-docker/) and start it."
need kind "Install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)."
need helm "Run 'make tools' (installs helm and kubectl into .venv/bin) or install Helm 3."
need kubectl "Run 'make tools' or install kubectl."
docker info >/dev/null 2>&1 || die "docker is installed but its daemon is not reachable (is it running? may you use it?)"

image_repo="${IMAGE%:*}"
image_tag="${IMAGE##*:}"
[[ "$image_repo" != "$IMAGE" ]] || die "IMAGE must be repository:tag, got '$IMAGE'"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    say "kind cluster '$CLUSTER_NAME' exists; reusing it"
else
    say "creating kind cluster '$CLUSTER_NAME' (1 control plane, workers in zone-a, zone-b, zone-c)"
    create_args=(create cluster --name "$CLUSTER_NAME" --config "$ROOT/deploy/kind/cluster.yaml" --wait 120s)
    if [[ -n "$KIND_NODE_IMAGE" ]]; then
        create_args+=(--image "$KIND_NODE_IMAGE")
    fi
    kind "${create_args[@]}"
fi
kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null

say "building image $IMAGE"
docker build --tag "$IMAGE" "$ROOT"

say "loading $IMAGE into the kind nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"

monitoring_args=()
if [[ "$MONITORING" == "1" ]]; then
    say "installing kube-prometheus-stack (Prometheus operator, Prometheus, Grafana) in namespace monitoring"
    helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null 2>&1 || true
    helm repo update prometheus-community >/dev/null
    # Pick up ServiceMonitors, rules and dashboards from every namespace, not only its own release's.
    helm upgrade --install monitoring prometheus-community/kube-prometheus-stack \
        --namespace monitoring --create-namespace --wait --timeout 10m \
        --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
        --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
        --set grafana.sidecar.dashboards.searchNamespace=ALL
    monitoring_args=(--set monitoring.enabled=true)
fi

say "installing chart $CHART as release '$RELEASE' in namespace '$NAMESPACE'"
# shellcheck disable=SC2086 # HELM_ARGS is a list of words on purpose
helm upgrade --install "$RELEASE" "$CHART" \
    --namespace "$NAMESPACE" --create-namespace \
    --set image.repository="$image_repo" \
    --set image.tag="$image_tag" \
    --set image.pullPolicy=Never \
    ${monitoring_args[@]+"${monitoring_args[@]}"} \
    --wait --timeout 5m ${HELM_ARGS:-}

kubectl -n "$NAMESPACE" get pods -o wide -l "app.kubernetes.io/instance=$RELEASE"

core_svc="$(kubectl -n "$NAMESPACE" get svc -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=core" -o jsonpath='{.items[0].metadata.name}')"
cat <<MSG

telehealth-mesh is up on kind cluster '$CLUSTER_NAME'.

Clinician console and core metrics:
  kubectl -n $NAMESPACE port-forward svc/$core_svc 8080:8080
  open http://127.0.0.1:8080/

Operator CLI against the core:
  kubectl -n $NAMESPACE port-forward svc/$core_svc 50051:50051
  telehealth-ctl edges
MSG
if [[ "$MONITORING" == "1" ]]; then
    cat <<MSG

Grafana (dashboard "Telehealth mesh"; user admin, password from the secret):
  kubectl -n monitoring get secret monitoring-grafana -o jsonpath='{.data.admin-password}' | base64 -d; echo
  kubectl -n monitoring port-forward svc/monitoring-grafana 3000:80
  open http://127.0.0.1:3000/
MSG
fi
printf '\nRemove everything with: %s\n' "deploy/kind/down.sh"
