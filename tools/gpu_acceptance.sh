#!/usr/bin/env bash
# GPU acceptance in one call (see tools/gpu_acceptance.py and README "GPU acceptance").
#   tools/gpu_acceptance.sh --wheels DIR            install offline, build, test, benchmark
#   tools/gpu_acceptance.sh --summary LOG           reprint a recorded run's summary
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_acceptance.py "$@"
