#!/usr/bin/env bash
# Debian packages that tests and benchmarks run for real, from apt (no other download site is
# reachable from these machines):
#   chromium   headless browser for the browser end-to-end tests
#   mosquitto  MQTT broker, the IoT baseline of the load tests (they start private brokers)
#   coturn     TURN relay for the media relay tests (they start private relays)
# Usage: install_debian.sh PACKAGE=BINARY ...  Installs, in one apt run, every package whose
# binary is missing; does nothing when all are there.
set -euo pipefail
missing=()
for spec in "$@"; do
    pkg="${spec%%=*}" bin="${spec#*=}"
    if ! [ -x "$bin" ] && ! command -v "$(basename "$bin")" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "install_debian: installing ${missing[*]} with apt-get" >&2
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
# The packages may start system services; the tests never use them (they run their own).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for svc in mosquitto coturn; do
        $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    done
fi
