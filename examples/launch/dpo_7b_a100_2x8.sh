#!/usr/bin/env bash
# Llama-2-7B DPO on 2 nodes x 8 A100. On each node:
#   NODE_RANK=<0|1> MASTER_ADDR=<node 0 host> bash examples/launch/dpo_7b_a100_2x8.sh
NNODES=2 exec bash "$(dirname "$0")/cluster.sh" dpo examples/configs/dpo_llama2_7b_a100_2x8.yaml "$@"
