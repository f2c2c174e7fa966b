#!/usr/bin/env bash
# One-command set-up: creates .venv and installs the pinned dependencies and
# the package itself (editable). Re-running it is safe and fast.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# DS_BUILD_OPS=0: DeepSpeed (tests only: reading its checkpoints) without compiling CUDA ops
DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
.venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c "import dynadiff, torch; print(f'dynadiff ready (torch {torch.__version__}) in .venv')"
