#!/usr/bin/env bash
# Install the Debian packages of a single-node SLURM cluster (slurmctld, slurmd,
# the client commands and munge), as used by tests/slurm and scripts/local_slurm.sh.
# Idempotent: does nothing when they are already installed. Starts no service.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_slurm: ${PACKAGES[*]} already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not found: install ${missing[*]} with your system's package manager" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: installing ${missing[*]} needs root (run: sudo $0)" >&2
    exit 1
fi

echo "install_slurm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d stops the packages' maintainer scripts from starting daemons
# (the tests start their own cluster, with their own configuration).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_slurm: done ($(slurmctld -V 2>/dev/null || echo 'slurmctld version unknown'))"
