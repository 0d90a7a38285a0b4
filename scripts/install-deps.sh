#!/usr/bin/env bash
# Installs the system packages Nestbox needs on Debian 12 / Ubuntu 22.04+.
# Idempotent: already-installed packages are left alone.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "run as root (or through sudo)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# qemu-system-x86 first: on machines with a newer qemu-utils from backports the two
# conflict, and installing qemu-system-x86 replaces it with the matching version.
# dnsmasq-base (the binary alone, no service) is for the test suite: the end-to-end
# tests' stand-in for the internet's DNS.
for pkg in qemu-system-x86 nftables debootstrap e2fsprogs lz4 cpio iproute2 ca-certificates dnsmasq-base; do
  have "$pkg" || need+=("$pkg")
done
# `--test`: what only the test suite needs — Debian's Chromium, the browser the
# dashboard's end-to-end tests drive (through playwright-core; no browser is downloaded);
# Debian's docker-registry, umoci and skopeo (with busybox-static for the image's userland
# and apache2-utils for the registry's password file): the OCI image tests' registry and
# the tools that make and push images there, without Docker.
if [ "${1:-}" = --test ]; then
  for pkg in chromium docker-registry skopeo umoci apache2-utils busybox-static; do
    have "$pkg" || need+=("$pkg")
  done
fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
have qemu-utils || apt-get install -y -qq --no-install-recommends qemu-utils
command -v qemu-img >/dev/null || { echo "qemu-img is missing after installing qemu-utils" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 is missing" >&2; exit 1; }
