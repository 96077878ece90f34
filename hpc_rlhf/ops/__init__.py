"""Fused ops with a torch reference beside each one.

``token_logprobs`` (vocab-parallel log-probs and entropy), ``masked_gae``,
``ppo_policy_loss``, ``value_loss``, ``swiglu`` (the gated MLP activation) and ``rms_norm``. Each takes
``backend="auto"|"torch"|"cpp"|"cuda"|"triton"``; see ``hpc_rlhf.ops._backend`` for how
"auto" chooses. Importing this package imports neither Triton nor megatron-core. ``hpc_rlhf.ops.cpu_gemm`` routes the CPU path's fp32
linear GEMMs to oneDNN (process-wide backend, see its docstring).
"""

from hpc_rlhf.ops.gae import masked_gae
from hpc_rlhf.ops.logprobs import token_logprobs
from hpc_rlhf.ops.ppo_loss import ppo_policy_loss
from hpc_rlhf.ops.rmsnorm import rms_norm
from hpc_rlhf.ops.swiglu import swiglu
from hpc_rlhf.ops.value_loss import value_loss

__all__ = ["masked_gae", "ppo_policy_loss", "rms_norm", "swiglu", "token_logprobs", "value_loss"]
