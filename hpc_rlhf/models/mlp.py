"""The gated MLP of the local layer spec with a fused SwiGLU activation.

megatron-core's ``MLP`` without transformer-engine or apex runs ``chunk -> silu -> mul``
(three [tokens, F] temporaries kept for backward, a ``cat`` in backward). ``SwiGLUMLP``
keeps its constructor, parameters and state-dict keys and routes the activation through
``hpc_rlhf.ops.swiglu`` (one pass each way on CPU, only the fc1 output saved). Settings the
fused op does not cover (other activations, clamping, GLU offsets, per-token scales) fall
back to megatron's own forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from hpc_rlhf.ops.swiglu import swiglu


class SwiGLUMLP(MLP):
    """Drop-in ``MLP``: same inputs and outputs ``(output, output_bias)``."""

    def _fusable(self) -> bool:
        cfg = self.config
        return (
            cfg.gated_linear_unit
            and cfg.activation_func is F.silu
            and getattr(cfg, "activation_func_clamp_value", None) is None
            and not getattr(cfg, "glu_linear_offset", 0.0)
            and not getattr(cfg, "use_te_activation_func", False)
        )

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not self._fusable():
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        fc1_SBF2, bias = self.linear_fc1(hidden_states)  # [s, b, 2F/tp]
        if bias is not None:
            fc1_SBF2 = fc1_SBF2 + bias
        return self.linear_fc2(swiglu(fc1_SBF2))  # [s, b, h], bias
