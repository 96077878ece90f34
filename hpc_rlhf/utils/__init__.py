"""hpc_rlhf.utils."""
