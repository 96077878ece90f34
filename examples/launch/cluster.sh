#!/usr/bin/env bash
# Multi-node launch of any stage (sft, rm, dpo, ppo, eval, pipeline). Run the same command on
# every node:
#   NNODES=2 NODE_RANK=<0..NNODES-1> MASTER_ADDR=<node 0 host> \
#     bash examples/launch/cluster.sh ppo examples/configs/ppo_llama2_7b_a100_2x8.yaml [key=value ...]
# NPROC_PER_NODE defaults to 8 (one process per GPU). Checkpoint directories must be on a
# filesystem every node sees (the run checks at start).
set -euo pipefail
STAGE=${1:?usage: cluster.sh STAGE CONFIG [dotted.key=value ...]}
CONFIG=${2:?usage: cluster.sh STAGE CONFIG [dotted.key=value ...]}
shift 2
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${NPROC_PER_NODE:=8}"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core TP/SP comm-compute overlap
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m hpc_rlhf.cli "$STAGE" --config "$CONFIG" "$@"
