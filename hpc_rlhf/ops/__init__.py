"""hpc_rlhf.ops."""
