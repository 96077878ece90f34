"""hpc_rlhf.data."""
