"""hpc_rlhf.algorithms."""
