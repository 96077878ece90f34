"""hpc_rlhf: RLHF training engine on megatron-core.

Importing the package pulls in torch only; megatron-core, Triton and optional accelerators
load in the modules that use them.
"""

__version__ = "0.1.0"
