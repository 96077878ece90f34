"""Build what a PPO run needs: models (with their initial weights) and the engine."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpc_rlhf.config import InputError, ModelConfig, PPORunConfig
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.trainable_model import TrainableModel

if TYPE_CHECKING:  # the engine module pulls in the inference stack; import it lazily
    from hpc_rlhf.inference.engine import GenerationEngine

logger = logging.getLogger(__name__)


@dataclass
class PPOModels:
    actor: TrainableModel
    reference: TrainableModel
    critic: TrainableModel | None
    reward_models: list[TrainableModel]
    reward_calibrations: list[tuple[float, float] | None]  # (mean, std) stored with each
    engine: GenerationEngine


def initial_actor_state(cfg: PPORunConfig) -> dict:
    """HF-format actor weights: the ``actor_init`` checkpoint, or seeded random weights."""
    if cfg.actor_init:
        from hpc_rlhf.models.hf_io import load_hf_checkpoint_for

        return load_hf_checkpoint_for(cfg.model, cfg.actor_init)
    from hpc_rlhf.models.init import random_hf_state

    return random_hf_state(cfg.model, seed=cfg.ppo.seed)


def _total_updates(cfg: PPORunConfig) -> int:
    p = cfg.ppo
    return max(1, p.steps * p.ppo_epochs * p.mini_batches_per_rollout)


def check_vocabularies(cfg: PPORunConfig, tokenizer=None) -> None:
    """Before any model is built: every id the tokenizer can give has an embedding in the
    actor (``model.vocab_size``), and every reward model embeds every id the actor can
    generate (its ``config.json`` read only). ``ValueError`` names the file otherwise
    (today's alternative: an ``IndexError`` deep in torch during the first step)."""
    vocab = cfg.model.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise InputError(
            f"tokenizer {getattr(tokenizer, 'path', cfg.data.tokenizer)} has "
            f"{tokenizer.vocab_size} tokens but model.vocab_size={vocab}: ids >= {vocab} have "
            "no embedding (use the actor's tokenizer, or the actor's vocab_size)"
        )
    from hpc_rlhf.models.hf_io import load_hf_config

    for spec in cfg.reward.models:
        rm_vocab = load_hf_config(spec.path).vocab_size
        if rm_vocab < vocab:
            raise InputError(
                f"reward model {spec.path}: vocab_size={rm_vocab} in its config.json is smaller "
                f"than the actor's model.vocab_size={vocab}, so the actor's token ids >= "
                f"{rm_vocab} have no embedding in it (a reward model must share the actor's "
                "tokenizer)"
            )
        if rm_vocab != vocab:
            logger.warning(
                "reward model %s has vocab_size=%d, the actor %d: it must use the actor's "
                "tokenizer (a padded vocabulary is fine)",
                spec.path,
                rm_vocab,
                vocab,
            )


def build_models(cfg: PPORunConfig, state: ParallelState, tokenizer=None) -> PPOModels:
    """Actor, reference (frozen copy), critic, reward models and the generation engine
    (vocabularies checked first against ``tokenizer`` when given, ``check_vocabularies``)."""
    check_vocabularies(cfg, tokenizer)
    actor_state = initial_actor_state(cfg)
    updates = _total_updates(cfg)
    pack = cfg.ppo.pack_sequences
    actor = TrainableModel(cfg.model, cfg.actor_optimizer, state, "actor", updates, pack)
    actor.load_hf_state(actor_state)
    reference = TrainableModel(cfg.model, None, state, "reference", pack_sequences=pack)
    reference.load_hf_state(actor_state)
    reward_models, reward_states, calibrations = [], [], []
    for spec in cfg.reward.models:
        model, hf_state, calibration = load_score_model(
            spec.path, cfg.model, cfg.parallel, state, cfg.ppo.pack_sequences
        )
        reward_models.append(model)
        calibrations.append(calibration)
        reward_states.append(hf_state)
    critic = None
    if cfg.ppo.uses_critic:
        critic = TrainableModel(cfg.model, cfg.critic_optimizer, state, "critic", updates, pack)
        if cfg.ppo.critic_init == "actor":
            critic.load_hf_state(actor_state)  # decoder from the actor, value head zero
        elif cfg.ppo.critic_init == "reward":
            critic.load_hf_state(reward_states[0])
    engine = build_engine(actor, cfg, state)
    return PPOModels(actor, reference, critic, reward_models, calibrations, engine)


def load_score_model(path: str, model: ModelConfig, parallel, state: ParallelState, pack: bool):
    """A frozen reward or cost model (an HF checkpoint with a ``score`` head), in this run's
    dtype, layout and packing, read at each row's last token; returns it with its HF state
    and its stored score calibration (``models.hf_io.read_score_normalization``)."""
    from hpc_rlhf.models.hf_io import load_hf_checkpoint, read_score_normalization

    rm_cfg, hf_state = load_hf_checkpoint(path)
    if "score.weight" not in hf_state:
        raise InputError(f"reward model {path} has no score head (score.weight)")
    rm_cfg = dataclasses.replace(
        rm_cfg, params_dtype=model.params_dtype, transformer_impl=model.transformer_impl
    )
    parallel.validate(rm_cfg)
    scorer = TrainableModel(
        rm_cfg, None, state, "reward", pack_sequences=pack, output_positions="last_token"
    )
    scorer.load_hf_state(hf_state)
    return scorer, hf_state, read_score_normalization(path)


def build_engine(actor: TrainableModel, cfg: PPORunConfig, state: ParallelState):
    """The colocated generation engine over the actor's weights."""
    from hpc_rlhf.inference.engine import GenerationEngine

    return GenerationEngine(actor, cfg.model, state, cfg.generation.engine)
