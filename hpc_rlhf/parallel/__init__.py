"""hpc_rlhf.parallel."""
