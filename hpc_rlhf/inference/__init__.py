"""Colocated generation with the actor's own weights (DESIGN.md, PPO stages 2 and 6).

* ``engine``: ``GenerationEngine`` / ``GenerationConfig`` - continuous batching over a paged
  KV cache, packed prefill, batched decode, ``generate(prompts, SamplingParams)``;
* ``sampling``: ``SamplingParams``, ``Completion`` and what their log-probs mean;
* ``kv_cache`` / ``scheduler`` / ``attention`` / ``forward``: the pieces of the engine;
* ``weights``: training layout -> generation layout, policy-version stamps;
* ``memory``: releasing / restoring optimizer state and gradient buffers around generation;
* ``cuda_graphs``: captured decode steps (GPU + flash-attn only).

Nothing is imported here: ``import hpc_rlhf.inference`` stays light.
"""
