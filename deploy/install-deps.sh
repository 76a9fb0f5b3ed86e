#!/usr/bin/env bash
# System packages for the real test guest (QEMU, busybox, cpio, the guest agent whose qemu-ga
# and libraries go into the guest's initramfs), the Prometheus e2e tests, the HTTP fault tests
# (prlimit, from util-linux) and the libvirt source: libvirtd and virsh for its e2e tests, and
# what building the libvirt-python binding (the test extra includes reclaimd[libvirt]) needs:
# libvirt-dev, pkg-config, gcc and the Python headers; Chromium (headless) for the status page's
# browser test; Debian's prometheus-libvirt-exporter, which bench/bench_libvirt.py compares with.
# Needs root (or sudo). Idempotent: installs only what is missing.
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static qemu-guest-agent cpio prometheus python3-venv systemd
  util-linux libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev
  chromium fonts-dejavu-core prometheus-libvirt-exporter)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
