"""Triton kernels (installed as hpc_rlhf.kernels). Import only where Triton is used."""
