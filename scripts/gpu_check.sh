#!/usr/bin/env bash
# The GPU check of fcos-d2, in one call, as it is, on a GPU machine without network:
#
#   bash scripts/gpu_check.sh                  # everything, within 8 minutes on one H200
#   bash scripts/gpu_check.sh --dry-run        # what a CPU can do of it (CI runs this)
#   bash scripts/gpu_check.sh --stages env,tests
#
# Figures and logs go to ${FCOS_D2_GPU_CHECK_OUT:-output/gpu_check} (JSON + Markdown) and, when
# $OUT is set, a copy of the summary to $OUT. Carry the wheels of scripts/gpu_wheels.sh
# (.gpu_wheels/) along. Details: scripts/gpu_check.py and the README's "GPU" section.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
