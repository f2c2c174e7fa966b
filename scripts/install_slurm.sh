#!/usr/bin/env bash
# Install the Debian packages of a single-node SLURM cluster (slurmctld, slurmd,
# the client commands and munge), as used by tests/slurm and scripts/local_slurm.sh.
# Idempotent: does nothing when they are already installed. Starts no service.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
# shellcheck source=apt_packages.sh
source "$(dirname "$0")/apt_packages.sh"
missing_packages install_slurm "${PACKAGES[@]}"
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
