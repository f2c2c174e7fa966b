#!/usr/bin/env bash
# SLURM in 1 minute on your laptop: a single-node cluster on localhost (as root; no systemd).
#   sudo scripts/install_slurm.sh          # once: Debian packages slurmctld slurmd slurm-client munge
#   sudo scripts/local_slurm.sh start      # prints the PATH to export
#   sudo scripts/local_slurm.sh status
#   sudo scripts/local_slurm.sh stop
# Options after the action: --dir DIR (default /tmp/dynadiff-slurm), --cpus N (default 16).
# Same code as the test suite's cluster: scripts/local_slurm.py.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="$repo/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
cd "$repo"
exec "$python" scripts/local_slurm.py "$@"
