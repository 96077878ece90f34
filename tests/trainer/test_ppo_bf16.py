"""PPO in bf16 mixed precision (``model.params_dtype: bf16``, the precision of every cluster
config): the toy task is learned at PP=2 (TP=2 x DP=2 with sequence parallelism and the
distributed optimizer: the bf16 demo config's test in tests/test_examples.py; the engine's
bf16 weights and KV cache: tests/inference/test_engine_bf16.py), and a resumed bf16 run
reproduces the uninterrupted one exactly (bf16 parameters, fp32 main parameters and Adam
state all restored)."""

from __future__ import annotations

import pytest

from tests.dist import run_world
from tests.trainer.test_ppo import _learned, _run, make_cfg, resumed_and_uninterrupted

BF16 = {"params_dtype": "bf16"}


def test_bf16_ppo_learns_the_toy_task_at_pp2():
    cfg = make_cfg(model=BF16, parallel={"pipeline_model_parallel_size": 2})
    history = run_world(_run, 2, cfg)[0]
    start, end = _learned(history)
    assert end > start + 0.05 and end > 3 * start, f"reward {start:.3f} -> {end:.3f}"
    assert all(h["response_length"] == 12 for h in history)


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "dist_adam"])
def test_bf16_resume_reproduces_the_uninterrupted_run(tmp_path, distributed_optimizer):
    """Before the fix, resuming copied the bf16 weights over the restored fp32 main
    parameters (megatron's reload_model_params): step 3's value loss differed."""
    parallel = {"use_distributed_optimizer": distributed_optimizer}
    resumed_and_uninterrupted(
        tmp_path, lambda ppo: make_cfg(ppo=ppo, model=BF16, parallel=parallel)
    )
