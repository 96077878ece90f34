"""hpc_rlhf.trainer."""
