"""hpc_rlhf.inference."""
