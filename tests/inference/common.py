"""Shared pieces of the generation tests: a tiny model, HF references, engines in worlds."""

from __future__ import annotations

import torch

from hpc_rlhf.config import ModelConfig, ParallelConfig

CFG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=256,
    max_position_embeddings=256,
)

# Prompts of different lengths (token ids >= 1).
PROMPT_LENS = (5, 11, 3, 17, 8, 24)


def make_prompts(lens=PROMPT_LENS, vocab: int = CFG.vocab_size, seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lens]


def hf_causal_lm(model_cfg: ModelConfig, seed: int = 1):
    """A transformers Llama (eager attention, fp32) with random weights, no EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpc_rlhf.models.hf_config import hf_config_from_model

    hf_cfg = LlamaConfig(**hf_config_from_model(model_cfg), attn_implementation="eager")
    hf_cfg.pad_token_id = 0
    hf_cfg.eos_token_id = None
    hf_cfg.bos_token_id = None
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(3.0)  # sharper distributions: fewer near-ties in greedy decoding
    return model


def hf_state(model) -> dict[str, torch.Tensor]:
    """The HF state dict as plain tensors."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``LlamaForCausalLM.generate`` greedy continuations, one prompt at a time."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=0,
            )
            out.append(gen[0, len(prompt) :].tolist())
    return out


def build_actor(model_cfg: ModelConfig, parallel: ParallelConfig, hf_weights, trainable=False):
    """Parallel groups + an actor ``TrainableModel`` (frozen unless ``trainable``) loaded
    with ``hf_weights``."""
    from hpc_rlhf.config import OptimizerConfig
    from hpc_rlhf.parallel.state import initialize_parallel
    from hpc_rlhf.trainer.trainable_model import TrainableModel

    state = initialize_parallel(parallel, model_cfg)
    optim = OptimizerConfig(lr=1e-3, clip_grad=1.0) if trainable else None
    actor = TrainableModel(model_cfg, optim, state, "actor", 10)
    actor.load_hf_state(hf_weights)
    return state, actor
