#!/usr/bin/env bash
# Safe-RLHF's PPO-Lagrangian on Llama-2-7B (reward + cost models, reward + cost critics) on
# 2 nodes x 8 A100. On each node:
#   NODE_RANK=<0|1> MASTER_ADDR=<node 0 host> bash examples/launch/ppo_lag_7b_a100_2x8.sh
NNODES=2 exec bash "$(dirname "$0")/cluster.sh" ppo examples/configs/ppo_lag_llama2_7b_a100_2x8.yaml "$@"
