#!/usr/bin/env bash
# Brings up telehealth-mesh on a local kind cluster: cluster (one control plane, three
# zone workers, node ports published on 127.0.0.1), image build and load, optional
# Prometheus/Grafana, optional mTLS, then the chart with deploy/kind/values.yaml. Prints the
# addresses of the console, the core, each zone's edge and the operator's login.
#
# Environment knobs:
#   CLUSTER_NAME     kind cluster name                       (default: telehealth)
#   NAMESPACE        namespace of the release                (default: telehealth)
#   RELEASE          Helm release name                       (default: telehealth)
#   IMAGE            image to build and load                 (default: telehealth-mesh:dev)
#   KIND_NODE_IMAGE  kindest/node image to run               (default: kind's own)
#   MONITORING       1 installs kube-prometheus-stack for Grafana and alerts (default: 1)
#   TLS              1 turns on mTLS with certificates from `telehealth-ctl pki init`, made
#                    with the image just built into var/kind-pki (default: 0)
#   HELM_ARGS        extra arguments for helm upgrade --install
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-telehealth}"
NAMESPACE="${NAMESPACE:-telehealth}"
RELEASE="${RELEASE:-telehealth}"
IMAGE="${IMAGE:-telehealth-mesh:dev}"
MONITORING="${MONITORING:-1}"
TLS="${TLS:-0}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
CHART="$ROOT/deploy/helm/telehealth-mesh"
VALUES="$ROOT/deploy/kind/values.yaml"
# deploy/kind/values.yaml sets fullnameOverride, so object names do not depend on RELEASE.
FULLNAME=telehealth
PKI_DIR="$ROOT/var/kind-pki"

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
    say "kind cluster '$CLUSTER_NAME' exists; reusing it (port mappings are those it was created with)"
else
    say "creating kind cluster '$CLUSTER_NAME' (1 control plane, workers in zone-a, zone-b, zone-c; node ports on 127.0.0.1)"
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

kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

tls_args=()
if [[ "$TLS" == "1" ]]; then
    say "making certificates in $PKI_DIR with telehealth-ctl pki init (existing ones are kept)"
    mkdir -p "$PKI_DIR"
    hosts="$FULLNAME-core.$NAMESPACE.svc"
    for z in zone-a zone-b zone-c; do hosts="$hosts,$FULLNAME-edge-$z.$NAMESPACE.svc"; done
    # The image's own telehealth-ctl, so the host needs no Python. --zones makes one
    # certificate per zone (edges-<zone>.crt, spiffe://telehealth/zone/<zone>) that every edge
    # pod of the zone presents; no per-edge-id certificates (pod names vary).
    docker run --rm --user "$(id -u):$(id -g)" -v "$PKI_DIR:/pki" "$IMAGE" \
        telehealth-ctl pki init --dir /pki --edges "" --zones zone-a,zone-b,zone-c --hosts "$hosts"
    secret() {  # name cert-basename: an idempotent create of one kubernetes.io/tls-like Secret
        kubectl -n "$NAMESPACE" create secret generic "$1" \
            --from-file=tls.crt="$PKI_DIR/$2.crt" --from-file=tls.key="$PKI_DIR/$2.key" \
            --from-file=ca.crt="$PKI_DIR/ca.crt" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    }
    secret telehealth-pki-core core
    for z in zone-a zone-b zone-c; do secret "telehealth-pki-zone-$z" "edges-$z"; done
    tls_args=(--set tls.enabled=true --set tls.existingSecretPrefix=telehealth-pki)
fi

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

say "installing chart $CHART as release '$RELEASE' in namespace '$NAMESPACE' (values: deploy/kind/values.yaml)"
# shellcheck disable=SC2086 # HELM_ARGS is a list of words on purpose
helm upgrade --install "$RELEASE" "$CHART" \
    --namespace "$NAMESPACE" --create-namespace \
    --values "$VALUES" \
    --set image.repository="$image_repo" \
    --set image.tag="$image_tag" \
    ${tls_args[@]+"${tls_args[@]}"} \
    ${monitoring_args[@]+"${monitoring_args[@]}"} \
    --wait --timeout 5m ${HELM_ARGS:-}

kubectl -n "$NAMESPACE" get pods -o wide -l "app.kubernetes.io/instance=$RELEASE"

# What the host reaches, read back from the cluster rather than assumed: the Services' node
# ports (cluster.yaml maps each to the same port on 127.0.0.1) and what the edges advertise.
node_port() {  # service port-name
    kubectl -n "$NAMESPACE" get svc "$1" -o jsonpath="{.spec.ports[?(@.name==\"$2\")].nodePort}"
}
core_grpc="127.0.0.1:$(node_port "$FULLNAME-core" grpc)"
console="http://127.0.0.1:$(node_port "$FULLNAME-core" http)/console"
tls_flags=""
if [[ "$TLS" == "1" ]]; then
    tls_flags=" --tls-cert-file $PKI_DIR/operator.crt --tls-key-file $PKI_DIR/operator.key --tls-ca-file $PKI_DIR/ca.crt"
fi

cat <<MSG

telehealth-mesh is up on kind cluster '$CLUSTER_NAME' (namespace $NAMESPACE).

Clinician console:   $console
Core gRPC (devices open sessions here, telehealth-ctl --core): $core_grpc
MSG
env_of() {  # zone variable: the value of one env var of the zone's edge container
    kubectl -n "$NAMESPACE" get deployment "$FULLNAME-edge-$1" \
        -o jsonpath="{.spec.template.spec.containers[0].env[?(@.name==\"$2\")].value}"
}
printf '\nEdges, per zone (what the edges advertise to devices and browsers):\n'
for z in zone-a zone-b zone-c; do
    printf '  %s: gRPC %s   HTTP %s (patient page %s/patient)   media %s-%s/UDP\n' "$z" \
        "$(env_of "$z" TELEHEALTH_ADVERTISE_ADDRESS)" "$(env_of "$z" TELEHEALTH_HTTP_ADVERTISE_URL)" \
        "$(env_of "$z" TELEHEALTH_HTTP_ADVERTISE_URL)" \
        "$(env_of "$z" TELEHEALTH_MEDIA_UDP_PORT_MIN)" "$(env_of "$z" TELEHEALTH_MEDIA_UDP_PORT_MAX)"
done

users="$FULLNAME-core-bootstrap-users"
device_tls=""
if [[ "$TLS" == "1" ]]; then
    device_tls=" --tls-cert-file $PKI_DIR/device.crt --tls-key-file $PKI_DIR/device.key --tls-ca-file $PKI_DIR/ca.crt"
fi
cat <<MSG

Passwords the chart generated (kept across upgrades):
  operator:  kubectl -n $NAMESPACE get secret $users -o jsonpath='{.data.operator-password}' | base64 -d; echo
  clinician: kubectl -n $NAMESPACE get secret $users -o jsonpath='{.data.clinician-password}' | base64 -d; echo

Operator CLI:
  telehealth-ctl --core $core_grpc$tls_flags login operator
  telehealth-ctl --core $core_grpc$tls_flags edges

Three simulated patients in zone-a (the clinician "clinician" sees them in the console):
  telehealth-device --core $core_grpc$device_tls --zone zone-a --patients 3
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
