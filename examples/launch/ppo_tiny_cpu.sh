#!/usr/bin/env bash
# The tiny PPO run on CPU with 4 gloo processes (TP=2 x DP=2), as CI runs it:
#   bash examples/launch/ppo_tiny_cpu.sh [dotted.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OMP_NUM_THREADS=1 exec "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=4 \
  -m hpc_rlhf.cli ppo --config examples/configs/ppo_tiny_cpu.yaml "$@"
