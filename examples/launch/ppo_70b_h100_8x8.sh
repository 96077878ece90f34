#!/usr/bin/env bash
# Llama-2-70B PPO on 8 nodes x 8 H100. On each node:
#   NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> bash examples/launch/ppo_70b_h100_8x8.sh
NNODES=8 exec bash "$(dirname "$0")/cluster.sh" ppo examples/configs/ppo_llama2_70b_h100_8x8.yaml "$@"
