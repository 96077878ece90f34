"""Resuming is exact across process lifetimes, and restores every RNG.

* A PPO run interrupted after a step past its last checkpoint and resumed in a *new*
  process group (fresh processes, fresh gloo world) reproduces the uninterrupted run bit
  for bit at TP=2 x DP=2 with the distributed optimizer (4 processes) and PP=2 (2
  processes): every metric but the timings, every actor parameter and critic shard, the
  KL controller, the reward statistics and ``metrics.jsonl``. The run has the state a resume must carry: the adaptive KL
  controller moving every step, reward normalisation, and a warmup + cosine learning-rate
  schedule with a floor. Each phase (uninterrupted, interrupted, resumed) is its own
  ``run_world`` call, so nothing survives between them but the files.
* ``load_checkpoint`` puts back the Python, NumPy, torch and megatron tensor-parallel RNG
  states each rank saved, even after the test disturbed them, so the next draws of each
  generator are the ones the saving run would have made.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from hpc_rlhf.config import ParallelConfig
from tests.dist import run_world
from tests.trainer.test_ppo import make_cfg

STEPS = 4
SAVE_INTERVAL = 2
CRASH_AFTER = 3  # one step past the step-2 checkpoint: its record is redone on resume

# The run's state beyond the weights: warmup (2 updates) then cosine down to min_lr over
# the 8 optimizer updates (4 steps x 2 mini-batches), the adaptive KL controller (8
# samples per step over a horizon of 16: up to +-10% a step; kl_target chosen near the
# measured per-sequence KL so the controller's error is not only at its +-0.2 clip), and
# running reward moments.
SECTIONS = {
    "actor_optimizer": {
        "lr": 2e-2,
        "min_lr": 2e-3,
        "warmup_steps": 2,
        "lr_decay_style": "cosine",
    },
    "critic_optimizer": {
        "lr": 5e-3,
        "min_lr": 5e-4,
        "warmup_steps": 2,
        "lr_decay_style": "cosine",
    },
    "ppo": {
        "steps": STEPS,
        "save_interval": SAVE_INTERVAL,
        "rollout_batch_size": 4,
        "n_samples_per_prompt": 2,
        "micro_batch_size_per_rank": 2,
        "mini_batches_per_rollout": 2,
        "kl_coef": 0.05,
        "kl_target": 0.3,
        "kl_horizon": 16,
    },
    "generation": {"max_new_tokens": 8},
    "reward": {"normalize": True},
}

LAYOUTS = {
    # the distributed optimizer, as the cluster configs run: its state is sharded over DP
    "tp2_dp2_distopt": (4, {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True}),
    "pp2": (2, {"pipeline_model_parallel_size": 2}),
}


def is_timing(key: str) -> bool:
    """Metrics that measure the machine, not the run: they differ between any two runs."""
    return key.startswith("time_") or key == "tokens_per_s"


class Interrupted(Exception):
    """Stands for the job being killed (pre-emption, node failure) after some step."""


def _phase(rank, world, cfg, out_dir, crash_after):
    """One phase in a fresh world: ``run_ppo(cfg, out_dir)``, interrupted after step
    ``crash_after`` when given (its metrics recorded, the step not checkpointed). Returns
    the history run_ppo returned (``None`` when interrupted), and the trainer's final
    state: actor parameters (HF naming, full shapes, on rank 0), this rank's shards of the
    critic (its trained score head has a bias, which HF's layout has no place for), KL
    coefficient and reward moments."""
    from hpc_rlhf.trainer import ppo_run
    from hpc_rlhf.trainer.run import Run

    built = {}
    build_trainer = ppo_run.build_trainer

    def keep_trainer(*args, **kwargs):
        run, trainer = build_trainer(*args, **kwargs)
        built["trainer"] = trainer
        return run, trainer

    ppo_run.build_trainer = keep_trainer  # type: ignore[assignment]
    if crash_after is not None:
        end_step = Run.end_step

        def end_step_then_crash(self, step, *args, **kwargs):
            end_step(self, step, *args, **kwargs)
            if step == crash_after:
                raise Interrupted(f"killed after step {step}")

        Run.end_step = end_step_then_crash  # type: ignore[method-assign]
    try:
        history = ppo_run.run_ppo(cfg, out_dir)
    except Interrupted:
        history = None
    trainer = built["trainer"]
    return {
        "history": history,
        "actor": trainer.actor.gather_hf_state(),
        "critic": shard_tensors(trainer.critic),
        "kl_coef": trainer.kl_ctl.value,
        "reward_moments": trainer.reward_moments.state_dict(),
    }


def shard_tensors(model) -> dict[str, torch.Tensor]:
    """This rank's tensors of ``model`` (every chunk's state dict), named by chunk."""
    return {
        f"{i}.{name}": value
        for i, chunk in enumerate(model.parameters_by_chunk())
        for name, value in chunk.state_dict().items()
        if isinstance(value, torch.Tensor)
    }


def read_jsonl(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if not is_timing(k)}


def assert_same_params(ours: dict, theirs: dict, what: str) -> None:
    """Bitwise equality of two HF state dicts (same names, same bits)."""
    assert sorted(ours) == sorted(theirs), what
    different = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_in_a_new_process_group_reproduces_the_uninterrupted_run(tmp_path, layout):
    world, parallel = LAYOUTS[layout]
    full_ckpt, ckpt = str(tmp_path / "full_ckpt"), str(tmp_path / "ckpt")
    full_out, out = str(tmp_path / "full_out"), str(tmp_path / "out")

    def cfg(save_dir):
        sections = {**SECTIONS, "ppo": {**SECTIONS["ppo"], "save_dir": save_dir}}
        return make_cfg(**sections, parallel=parallel)

    full_ranks = run_world(_phase, world, cfg(full_ckpt), full_out, None)
    run_world(_phase, world, cfg(ckpt), out, CRASH_AFTER)
    with open(os.path.join(ckpt, "latest")) as fh:
        assert fh.read().strip() == "step_000002"  # step 3 was lost with the crash
    resumed_ranks = run_world(_phase, world, cfg(ckpt), out, None)
    full, resumed = full_ranks[0], resumed_ranks[0]

    history = full["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    # the state a resume must carry is live in this run
    coefs = [SECTIONS["ppo"]["kl_coef"]] + [h["kl_coef"] for h in history]
    # value *= 1 + error x 8 / 16, error clipped to [-0.2, 0.2]
    errors = [2 * (b / a - 1) for a, b in zip(coefs, coefs[1:])]
    assert all(e != 0 for e in errors), f"adaptive KL did not move every step: {errors}"
    # the observed KL drives it: at least once by less than the clip (Intel Xeon), or both
    # ways (AMD EPYC: errors -0.2, -0.2, +0.2, +0.2)
    assert any(abs(e) < 0.19 for e in errors) or min(errors) < 0 < max(errors), errors
    lrs = [h["actor_lr"] for h in history]
    assert lrs[0] < lrs[1] and lrs[3] < lrs[2], f"no warmup then decay: {lrs}"
    assert full["reward_moments"]["count"] == pytest.approx(STEPS * 8)

    for ours, theirs in zip(resumed["history"], history[2:]):
        assert without_timing(ours) == without_timing(theirs), f"step {theirs['step']}"
    assert resumed["kl_coef"] == full["kl_coef"]
    assert resumed["reward_moments"] == full["reward_moments"]
    assert_same_params(resumed["actor"], full["actor"], "actor")
    for rank, (ours, theirs) in enumerate(zip(resumed_ranks, full_ranks)):
        assert_same_params(ours["critic"], theirs["critic"], f"critic shards of rank {rank}")
    # one history: the crashed run's step-3 record is replaced by the redone step
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    full_records = read_jsonl(os.path.join(full_out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [without_timing(r) for r in records] == [without_timing(r) for r in full_records]


# ----------------------------------------------------------------------------- RNG states


def rng_snapshot() -> dict:
    """Copies of every generator state a checkpoint stores for this process."""
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state().clone(),
        "tracker": {
            name: state.clone()
            for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
    }


def rng_draws() -> dict:
    """A few numbers from every generator (consuming them), the tracker's through its
    ``fork`` as model code (dropout in tensor-parallel regions) draws them."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    return {
        "python": [random.random() for _ in range(4)],
        "numpy": np.random.rand(4).tolist(),
        "torch": torch.rand(4).tolist(),
        "tracker": forked.tolist(),
    }


def disturb_rngs(rank: int) -> None:
    """What happens to the generators between a save and a resume in another process:
    other seeds, other positions, another tracker stream."""
    from megatron.core import tensor_parallel

    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    torch.manual_seed(1000 + rank)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    for _ in range(3):
        with tracker.fork():
            torch.rand(16)


def _rng_roundtrip(rank, world, root):
    from hpc_rlhf.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from tests.parallel.common import TINY, build_trainable, random_hf_state

    state, model = build_trainable(
        TINY, ParallelConfig(tensor_model_parallel_size=world), random_hf_state(TINY)
    )
    random.seed(7 + rank)
    np.random.seed(8 + rank)
    torch.manual_seed(9 + rank)
    rng_draws()  # not at the start of the streams
    saved = rng_snapshot()
    save_checkpoint(root, 1, state, {"actor": model})
    after_save = rng_draws()
    disturb_rngs(rank)
    disturbed = rng_snapshot()
    load_checkpoint(latest_checkpoint(root), state, {"actor": model})
    restored = rng_snapshot()
    return saved, disturbed, restored, after_save, rng_draws()


def same_rng_state(a, b) -> bool:
    """Equality of two states as ``rng_snapshot`` gives them (tensors, NumPy arrays)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_rng_state(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_rng_state(x, y) for x, y in zip(a, b))
    return a == b


def test_load_checkpoint_restores_every_rng_state_of_each_rank(tmp_path):
    results = run_world(_rng_roundtrip, 2, str(tmp_path / "ckpt"))
    (saved0, *_), (saved1, *_) = results
    assert saved0["tracker"], "megatron's tracker has no states: nothing would be checked"
    # the two TP ranks have their own tracker streams: a swapped file would show
    assert not same_rng_state(saved0["tracker"], saved1["tracker"])
    for rank, (saved, disturbed, restored, after_save, after_load) in enumerate(results):
        for kind in saved:
            assert not same_rng_state(disturbed[kind], saved[kind]), (rank, kind)
            assert same_rng_state(restored[kind], saved[kind]), f"rank {rank}: {kind} state"
        assert after_load == after_save, f"rank {rank}: the draws after the resume differ"
