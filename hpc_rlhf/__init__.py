"""hpc_rlhf: RLHF training engine on megatron-core.

Importing the package pulls in torch only (and changes nothing in the process: the
host-memory launch environment of ``parallel/host_allocator.py`` is applied when a run
starts, ``trainer.run.Run``); megatron-core, Triton and optional accelerators load in the
modules that use them.
"""

__version__ = "0.1.0"
