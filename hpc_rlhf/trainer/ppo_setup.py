"""Build what a PPO run needs: models (with their initial weights) and the engine."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpc_rlhf.config import InputError, ModelConfig, PPORunConfig
from hpc_rlhf.parallel.state import ParallelState
from hpc_rlhf.trainer.score_sources import ScoreSources
from hpc_rlhf.trainer.trainable_model import TrainableModel

if TYPE_CHECKING:  # the engine module pulls in the inference stack; import it lazily
    from hpc_rlhf.inference.engine import GenerationEngine

logger = logging.getLogger(__name__)


@dataclass
class PPOModels:
    actor: TrainableModel
    reference: TrainableModel
    critic: TrainableModel | None
    rewards: ScoreSources
    engine: GenerationEngine
    costs: ScoreSources | None = None  # ppo.algorithm=ppo_lag
    cost_critic: TrainableModel | None = None


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

    specs = [("reward", s) for s in cfg.reward.models]
    specs += [("cost", s) for s in (cfg.cost.models if cfg.cost is not None else ())]
    for kind, spec in specs:
        rm_vocab = load_hf_config(spec.path).vocab_size
        if rm_vocab < vocab:
            raise InputError(
                f"{kind} model {spec.path}: vocab_size={rm_vocab} in its config.json is smaller "
                f"than the actor's model.vocab_size={vocab}, so the actor's token ids >= "
                f"{rm_vocab} have no embedding in it (a reward model must share the actor's "
                "tokenizer)"
            )
        if rm_vocab != vocab:
            logger.warning(
                "%s model %s has vocab_size=%d, the actor %d: it must use the actor's "
                "tokenizer (a padded vocabulary is fine)",
                kind,
                spec.path,
                rm_vocab,
                vocab,
            )


def build_models(cfg: PPORunConfig, state: ParallelState, tokenizer=None) -> PPOModels:
    """Actor, reference (frozen copy), critic, reward models (and PPO-Lagrangian's cost
    models and cost critic) and the generation engine (vocabularies checked first against
    ``tokenizer`` when given, ``check_vocabularies``)."""
    check_vocabularies(cfg, tokenizer)
    actor_state = initial_actor_state(cfg)
    actor = _trained_model(cfg, state, "actor", cfg.actor_optimizer, actor_state)
    reference = TrainableModel(
        cfg.model,
        None,
        state,
        "reference",
        pack_sequences=cfg.ppo.pack_sequences,
        share_prefixes=cfg.ppo.share_prefixes,
    )
    reference.load_hf_state(actor_state)
    rewards, reward_states = _score_sources(cfg, state, cfg.reward, "reward")
    critic = None
    if cfg.ppo.uses_critic:
        init = {"actor": actor_state, "reward": (reward_states or [None])[0]}
        critic_state = init.get(cfg.ppo.critic_init)  # random: the value head and decoder seeded
        critic = _trained_model(cfg, state, "critic", cfg.critic_optimizer, critic_state)
    costs, cost_critic = None, None
    if cfg.ppo.constrained:
        assert cfg.cost is not None  # PPORunConfig.validate
        costs, cost_states = _score_sources(cfg, state, cfg.cost, "cost")
        init = {"actor": actor_state, "cost": (cost_states or [None])[0]}
        cost_critic = _trained_model(
            cfg, state, "critic", cfg.cost_critic_optimizer, init.get(cfg.cost_critic_init)
        )
    engine = build_engine(actor, cfg, state)
    return PPOModels(actor, reference, critic, rewards, engine, costs, cost_critic)


def _trained_model(cfg: PPORunConfig, state, role: str, optimizer, hf_state: dict | None):
    """A trained PPO model (actor, critic or cost critic) from ``hf_state`` (a critic takes
    the decoder of an actor or the decoder and score head of a reward / cost model; its
    value head starts at zero from an actor); ``None``: seeded random weights."""
    updates = _total_updates(cfg)
    model = TrainableModel(
        cfg.model,
        optimizer,
        state,
        role,
        updates,
        cfg.ppo.pack_sequences,
        share_prefixes=cfg.ppo.share_prefixes,
    )
    if hf_state is not None:
        model.load_hf_state(hf_state)
    return model


def _score_sources(cfg: PPORunConfig, state, section, kind: str) -> tuple[ScoreSources, list]:
    """The frozen models of PPO's ``reward`` / ``cost`` section with its rules, and the
    models' HF states (a critic may start from the first)."""
    ppo = cfg.ppo
    return load_score_sources(
        section, kind, cfg.model, cfg.parallel, state, ppo.pack_sequences, ppo.share_prefixes
    )


def load_score_sources(
    section,
    kind: str,
    model_cfg: ModelConfig,
    parallel,
    state,
    pack: bool,
    share_prefixes: bool = True,
) -> tuple[ScoreSources, list]:
    """The frozen models of a ``reward`` / ``cost`` section (``config.RewardConfig``) in
    this run's dtype, layout and packing, with its rules, and the models' HF states."""
    models, hf_states, calibrations = [], [], []
    for spec in section.models:
        model, hf_state, calibration = load_score_model(
            spec.path, model_cfg, parallel, state, pack, kind, share_prefixes
        )
        models.append(model)
        hf_states.append(hf_state)
        calibrations.append(calibration)
    sources = ScoreSources(section, kind, models, calibrations, state.model_parallel_group)
    return sources, hf_states


def load_score_model(
    path: str,
    model: ModelConfig,
    parallel,
    state: ParallelState,
    pack: bool,
    kind: str = "reward",
    share_prefixes: bool = True,
):
    """A frozen reward or cost model (an HF checkpoint with a ``score`` head), in this run's
    dtype, layout and packing, read at each row's last token; returns it with its HF state
    and its stored score calibration (``models.hf_io.read_score_normalization``)."""
    from hpc_rlhf.models.hf_io import load_hf_checkpoint, read_score_normalization

    rm_cfg, hf_state = load_hf_checkpoint(path)
    if "score.weight" not in hf_state:
        raise InputError(f"{kind} model {path} has no score head (score.weight)")
    rm_cfg = dataclasses.replace(
        rm_cfg, params_dtype=model.params_dtype, transformer_impl=model.transformer_impl
    )
    parallel.validate(rm_cfg)
    scorer = TrainableModel(
        rm_cfg,
        None,
        state,
        "reward",
        pack_sequences=pack,
        output_positions="last_token",
        share_prefixes=share_prefixes,
    )
    scorer.load_hf_state(hf_state)
    return scorer, hf_state, read_score_normalization(path)


def build_engine(actor: TrainableModel, cfg: PPORunConfig, state: ParallelState):
    """The colocated generation engine over the actor's weights."""
    from hpc_rlhf.inference.engine import GenerationEngine

    return GenerationEngine(actor, cfg.model, state, cfg.generation.engine)
