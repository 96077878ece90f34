"""hpc_rlhf.models."""
