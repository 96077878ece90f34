"""hpc_rlhf: RLHF training engine on megatron-core.

Importing the package pulls in torch only; megatron-core, Triton and optional accelerators
load in the modules that use them. The package sets the engine's host-memory launch
environment (``parallel/host_allocator.py``: huge pages for large CPU tensors) before
anything here imports torch; ``THP_MEM_ALLOC_ENABLE=0`` in the environment opts out.
"""

from hpc_rlhf.parallel.host_allocator import apply_launch_env as _apply_launch_env

_apply_launch_env()

__version__ = "0.1.0"
