#!/usr/bin/env bash
# System packages for the real test guest (QEMU, busybox, cpio), the Prometheus e2e tests and
# the HTTP fault tests (prlimit, from util-linux).
# Needs root (or sudo). Idempotent: installs only what is missing.
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static cpio prometheus python3-venv systemd util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
