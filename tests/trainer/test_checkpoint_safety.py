"""Checkpoint safety: loading cannot run code, broken or missing checkpoints are named (and
fallen back from on request) with every rank agreeing, existing checkpoints are never
deleted, files are fsynced before a checkpoint is published, ranks that do not share the
checkpoint directory are found at start, unwritable output directories are found at start,
the last step is saved without ``save_interval``, the metrics history is one per run, and a
DP-only layout change resumes.

Most tests drive the checkpoint functions in this process with a stand-in model (one
``nn.Linear`` chunk, no optimizer) and a stand-in ``ParallelState``; the agreement and
shared-directory checks run in a 2-rank gloo world, the optimizer state over a DP change in
real 2- and 1-rank worlds, and the run wiring in one tiny PPO run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from types import SimpleNamespace

import pytest
import torch

from hpc_rlhf.config import ParallelConfig
from tests.dist import run_world

# ----------------------------------------------------------------------------- stand-ins


def fake_state(rank=0, world_size=1, dp_rank=0, dp_size=1, tp_size=1, dist_opt=False):
    """What the checkpoint functions read of a ``ParallelState``."""
    return SimpleNamespace(
        world_size=world_size,
        rank=rank,
        tp_size=tp_size,
        tp_rank=0,
        pp_size=1,
        pp_rank=0,
        dp_size=dp_size,
        dp_rank=dp_rank,
        vpp_size=None,
        config=SimpleNamespace(use_distributed_optimizer=dist_opt),
    )


class TinyModel:
    """What the checkpoint functions use of a ``TrainableModel``: chunks, no optimizer."""

    role = "actor"
    optimizer = None

    def __init__(self, seed: int, size: int = 4):
        self.chunk = torch.nn.Linear(size, size)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.chunk.weight.copy_(torch.randn(size, size, generator=gen))

    def parameters_by_chunk(self):
        return [self.chunk]


def save_steps(root, steps, state=None, size=4):
    from hpc_rlhf.trainer.checkpoint import save_checkpoint

    for step in steps:
        model = TinyModel(seed=step, size=size)
        save_checkpoint(root, step, state or fake_state(), {"actor": model}, {"position": step})


def weight_of(step: int) -> torch.Tensor:
    return TinyModel(seed=step).chunk.weight.detach()


def actor_file(root, step, dp=0):
    return os.path.join(root, f"step_{step:06d}", "actor", f"tp00_pp000_dp{dp:03d}.pt")


# ------------------------------------------------------------- 1: loading cannot run code


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "relative", ["trainer.pt", "rng/rank00000.pt", "actor/tp00_pp000_dp000.pt"]
)
def test_a_pickle_payload_in_any_checkpoint_file_is_refused_and_named(tmp_path, relative):
    from hpc_rlhf.trainer.checkpoint import CheckpointError, load_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1])
    path = os.path.join(root, "step_000001")
    target = os.path.join(path, relative)
    marker = tmp_path / "pwned"
    torch.save({"chunks": _Payload(str(marker))}, target)
    with pytest.raises(CheckpointError, match=re.escape(target)):
        load_checkpoint(path, fake_state(), {"actor": TinyModel(seed=0)})
    assert not marker.exists(), "loading a checkpoint ran code from it"
    # the payload is live: an unsafe load does run it (so the test above can fail)
    torch.load(target, weights_only=False)
    assert marker.exists()


def test_convert_tool_refuses_a_payload_and_names_the_shard(tmp_path, capsys):
    import importlib.util

    from tests.parallel.common import TINY, random_hf_state

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint",
        os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_checkpoint.py"),
    )
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    from hpc_rlhf.models.hf_io import save_hf_checkpoint

    hf, mcore, out = str(tmp_path / "hf"), str(tmp_path / "mcore"), str(tmp_path / "out")
    save_hf_checkpoint(hf, TINY, random_hf_state(TINY))
    assert cli.main(["hf-to-mcore", "--hf", hf, "--out", mcore]) == 0
    shard = os.path.join(mcore, cli.mcore_rank_dir(0, 0, 1), "model.pt")
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(str(marker))}, shard)
    assert cli.main(["mcore-to-hf", "--mcore", mcore, "--out", out]) == 2
    assert not marker.exists() and shard in capsys.readouterr().err


# ------------------------------------------ 3: no `latest`, and never delete a checkpoint


def test_without_latest_the_newest_complete_step_resumes_with_a_warning(tmp_path, caplog):
    from hpc_rlhf.trainer.checkpoint import latest_checkpoint, load_latest_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1, 2])
    os.makedirs(os.path.join(root, "step_000003", "actor"))  # incomplete: no meta.json
    os.remove(os.path.join(root, "latest"))
    newest = os.path.join(root, "step_000002")
    assert latest_checkpoint(root) == newest
    model = TinyModel(seed=0)
    with caplog.at_level(logging.WARNING):
        path, saved = load_latest_checkpoint(root, fake_state(), {"actor": model})
    assert path == newest and saved["step"] == 2 and saved["position"] == 2
    assert torch.equal(model.chunk.weight.detach(), weight_of(2))
    assert any(newest in r.getMessage() and "latest" in r.getMessage() for r in caplog.records)


def test_saving_a_step_that_exists_moves_the_old_one_aside(tmp_path):
    from hpc_rlhf.trainer.checkpoint import load_checkpoint, save_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1, 2])  # an earlier run's checkpoints
    save_checkpoint(root, 2, fake_state(), {"actor": TinyModel(seed=20)}, {"position": 20})
    aside = [e for e in os.listdir(root) if e.startswith("step_000002.replaced-")]
    assert len(aside) == 1, os.listdir(root)
    old = TinyModel(seed=0)
    load_checkpoint(os.path.join(root, aside[0]), fake_state(), {"actor": old})
    assert torch.equal(old.chunk.weight.detach(), weight_of(2))  # kept intact
    new = TinyModel(seed=0)
    assert (
        load_checkpoint(os.path.join(root, "step_000002"), fake_state(), {"actor": new})["position"]
        == 20
    )
    assert torch.equal(new.chunk.weight.detach(), TinyModel(seed=20).chunk.weight.detach())


# ------------------------------------------------- 4: corrupt files: named, fallback


def test_a_truncated_file_is_named_with_the_older_checkpoints_listed(tmp_path):
    from hpc_rlhf.trainer.checkpoint import CheckpointError, load_latest_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1, 2, 3])
    broken = actor_file(root, 3)
    with open(broken, "r+b") as fh:
        fh.truncate(os.path.getsize(broken) // 2)
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(root, fake_state(), {"actor": TinyModel(seed=0)})
    message = str(info.value)
    assert broken in message
    older = [os.path.join(root, "step_000002"), os.path.join(root, "step_000001")]
    assert message.index(older[0]) < message.index(older[1])  # newest first
    assert "ppo.resume_fallback=true" in message


def test_fallback_loads_the_previous_complete_checkpoint(tmp_path, caplog):
    from hpc_rlhf.trainer.checkpoint import load_latest_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1, 2, 3, 4])
    with open(actor_file(root, 4), "wb") as fh:
        fh.write(b"not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, actor_file(root, 3))  # readable, wrong content
    os.rename(os.path.join(root, "step_000002"), os.path.join(root, "elsewhere"))  # gone
    model = TinyModel(seed=0)
    with caplog.at_level(logging.WARNING):
        path, saved = load_latest_checkpoint(root, fake_state(), {"actor": model}, fallback=True)
    assert path == os.path.join(root, "step_000001") and saved["step"] == 1
    assert torch.equal(model.chunk.weight.detach(), weight_of(1))
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert actor_file(root, 4) in warned and actor_file(root, 3) in warned
    assert "falling back to" in warned


def test_latest_naming_a_missing_directory_lists_the_older_ones(tmp_path):
    from hpc_rlhf.trainer.checkpoint import CheckpointError, latest_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1, 2])
    os.rename(os.path.join(root, "step_000002"), os.path.join(root, "gone"))
    with pytest.raises(CheckpointError, match="step_000002") as info:
        latest_checkpoint(root)
    assert os.path.join(root, "step_000001") in str(info.value)


# ------------------------------------------------------------- 5: fsync before publishing


def test_every_file_and_directory_is_fsynced_before_the_checkpoint_is_published(
    tmp_path, monkeypatch
):
    root = str(tmp_path / "ckpt")
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_steps(root, [1])
    final = os.path.join(root, "step_000001")
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    tmp = events[publish][1]
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    # a file fsynced under a temporary name, then renamed (meta.json), counts as synced
    synced_before |= {e[2] for e in events[:publish] if e[0] == "replace" and e[1] in synced_before}
    for dirpath, dirnames, filenames in os.walk(final):
        for name in [*filenames, *dirnames]:
            path = os.path.join(dirpath, name).replace(final, tmp, 1)
            assert path in synced_before, f"{path} not fsynced before publishing"
    assert tmp in synced_before
    synced_after = [e[1] for e in events[publish:] if e[0] == "fsync"]
    assert synced_after.count(root) >= 1  # the rename itself is made durable


# --------------------------------------------- 2: unwritable output dirs found at start


def _start_run(rank, world, cfg):
    from hpc_rlhf.trainer.checkpoint import CheckpointError
    from hpc_rlhf.trainer.run import Run, RunSettings

    try:
        Run(cfg, RunSettings.of(cfg.ppo, "ppo"))
    except CheckpointError as err:
        return str(err)
    return None


def test_unwritable_save_dir_and_hf_export_dir_stop_the_run_at_start(tmp_path):
    from tests.trainer.test_ppo import make_cfg

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = str(blocker / "ckpt")
    messages = [
        run_world(_start_run, 1, make_cfg(ppo={"save_dir": bad}))[0],
        run_world(_start_run, 1, make_cfg(ppo={"hf_export_dir": bad}))[0],
    ]
    for key, message in zip(("ppo.save_dir", "ppo.hf_export_dir"), messages):
        assert message is not None and key in message and bad in message, message


# -------------------------------------- 4 + 5 in a 2-rank world: agreement, shared dir


def _two_ranks(rank, world, root, shared):
    from hpc_rlhf.parallel.comm import barrier
    from hpc_rlhf.trainer.checkpoint import load_latest_checkpoint
    from hpc_rlhf.trainer.checkpoint_files import CheckpointError, check_shared_directory

    out = {}
    state = fake_state(rank=rank, world_size=2, dp_rank=rank, dp_size=2)
    save_steps(root, [1, 2], state)
    if rank == 1:  # only rank 1's RNG file of step 2 is broken
        with open(os.path.join(root, "step_000002", "rng", "rank00001.pt"), "wb") as fh:
            fh.write(b"\x80garbage")
    barrier()
    model = TinyModel(seed=0)
    try:
        load_latest_checkpoint(root, state, {"actor": model})
        out["strict"] = None
    except CheckpointError as err:
        out["strict"] = str(err)
    path, saved = load_latest_checkpoint(root, state, {"actor": model}, fallback=True)
    out["fallback"] = (path, saved["step"], torch.equal(model.chunk.weight, weight_of(1)))
    # applying fails on rank 1 only (a model of another shape): every rank raises
    try:
        other = TinyModel(seed=0, size=5 if rank == 1 else 4)
        load_latest_checkpoint(root, state, {"actor": other}, fallback=True)
        out["apply"] = None
    except CheckpointError as err:
        out["apply"] = str(err)
    for case, path in (("same", shared), ("split", os.path.join(shared, f"rank{rank}"))):
        try:
            check_shared_directory(path, rank, "ppo.save_dir")
            out[case] = None
        except CheckpointError as err:
            out[case] = str(err)
    out["probe_left"] = [e for e in os.listdir(shared) if e.startswith(".shared-probe")]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt2"))
    shared = str(tmp_path_factory.mktemp("shared"))
    return root, run_world(_two_ranks, 2, root, shared)


def test_all_ranks_agree_when_one_rank_cannot_read_its_file(two_ranks):
    root, (r0, r1) = two_ranks
    broken = os.path.join(root, "step_000002", "rng", "rank00001.pt")
    for out in (r0, r1):
        assert out["strict"] is not None and broken in out["strict"]
        assert "rank 1" in out["strict"] and os.path.join(root, "step_000001") in out["strict"]
        assert out["fallback"] == (os.path.join(root, "step_000001"), 1, True)
        assert out["apply"] is not None and "rank 1" in out["apply"]


def test_ranks_that_do_not_see_rank_0s_directory_are_named(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["same"] is None and r1["same"] is None
    assert r0["probe_left"] == []
    host = socket.gethostname()
    for out in (r0, r1):
        assert out["split"] is not None and f"rank 1 on {host}" in out["split"]
        assert "rank 0 on" not in out["split"] and "ppo.save_dir" in out["split"]


# ------------------------------------------------------------------- 6: metrics history


def test_metrics_history_truncates_when_fresh_and_drops_redone_steps_on_resume(tmp_path):
    from hpc_rlhf.utils.logging import MetricsSink

    path = tmp_path / "metrics.jsonl"

    def steps():
        return [json.loads(line)["step"] for line in path.read_text().splitlines()]

    sink = MetricsSink(str(tmp_path), enabled=True, tensorboard=False)
    for step in range(1, 6):
        sink.write(step, {"loss": float(step)})
    sink.close()
    with open(path, "a") as fh:
        fh.write('{"step": 6, "lo')  # torn by a crash
    sink = MetricsSink(str(tmp_path), enabled=True, tensorboard=False)
    sink.begin(3)  # resumed from the step-3 checkpoint
    sink.write(4, {"loss": 40.0})
    sink.close()
    assert steps() == [1, 2, 3, 4]
    sink = MetricsSink(str(tmp_path), enabled=True, tensorboard=False)
    sink.begin(None)  # an unrelated fresh run
    sink.write(1, {"loss": 1.0})
    sink.close()
    assert steps() == [1]


def test_reward_table_numbers_the_steps_as_the_run_does():
    from hpc_rlhf.trainer.ppo_run import reward_table

    history = [
        {"step": s, "reward_mean": 0.1 * s, "kl": 0.0, "response_length": 12.0} for s in (7, 8)
    ]
    rows = reward_table(history).splitlines()[2:]
    assert [int(r.split("|")[0]) for r in rows] == [7, 8]


def _ppo_runs(rank, world, out_dir, save_dir):
    from hpc_rlhf.trainer.ppo_run import reward_table, run_ppo
    from tests.trainer.test_ppo import make_cfg

    metrics = os.path.join(out_dir, "metrics.jsonl")

    def steps():
        with open(metrics) as fh:
            return [json.loads(line)["step"] for line in fh]

    out = {}
    run_ppo(make_cfg(ppo={"steps": 2, "save_dir": save_dir}), out_dir)  # save_interval 0
    out["saved"] = sorted(e for e in os.listdir(save_dir) if e.startswith("step_"))
    with open(metrics, "a") as fh:  # a step a crashed run recorded but did not save
        fh.write(json.dumps({"step": 3, "reward_mean": 99.0}) + "\n")
    resumed = run_ppo(make_cfg(ppo={"steps": 3, "save_dir": save_dir}), out_dir)
    out["resumed_steps"] = [h["step"] for h in resumed]
    out["after_resume"] = steps()
    out["table"] = reward_table(resumed)
    run_ppo(make_cfg(ppo={"steps": 1}), out_dir)  # an unrelated fresh run, same out_dir
    out["after_fresh"] = steps()
    return out


def test_ppo_run_saves_the_last_step_and_keeps_one_metrics_history(tmp_path):
    out = run_world(_ppo_runs, 1, str(tmp_path / "out"), str(tmp_path / "ckpt"))[0]
    assert out["saved"] == ["step_000002"]  # no save_interval: the last step is saved
    assert out["resumed_steps"] == [3]
    assert out["after_resume"] == [1, 2, 3]
    assert int(out["table"].splitlines()[2].split("|")[0]) == 3
    assert out["after_fresh"] == [1]


# ------------------------------------------------------------------ 7: DP-only change


def test_a_dp_only_change_resumes_from_the_dp000_files(tmp_path, caplog):
    from hpc_rlhf.trainer.checkpoint import load_latest_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1], fake_state(world_size=2, dp_size=2))
    model = TinyModel(seed=0)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        _, saved = load_latest_checkpoint(root, fake_state(), {"actor": model})
    assert torch.equal(torch.get_rng_state(), rng_before)  # not another rank's stream
    assert saved["step"] == 1 and torch.equal(model.chunk.weight.detach(), weight_of(1))
    assert any("RNG" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "now", [fake_state(tp_size=2), fake_state(dp_size=2, dp_rank=0, dist_opt=True)]
)
def test_other_layout_changes_say_what_is_supported(tmp_path, now):
    from hpc_rlhf.trainer.checkpoint import CheckpointError, load_latest_checkpoint

    root = str(tmp_path / "ckpt")
    save_steps(root, [1])
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(root, now, {"actor": TinyModel(seed=0)})
    message = str(info.value)
    assert "same tp/pp/vpp with any dp" in message and "distributed optimizer" in message
    assert "hf_export_dir" in message and "not training checkpoints" in message


def _dp_change(rank, world, root, steps_before):
    """Train ``steps_before`` steps, save (in the 2-rank world), or resume (1 rank); then
    one more step: its loss and the updated weights."""
    from hpc_rlhf.trainer.checkpoint import load_latest_checkpoint, save_checkpoint
    from hpc_rlhf.trainer.losses import lm_loss_fn
    from tests.parallel.common import (
        TINY,
        build_trainable,
        dp_share,
        lm_microbatches,
        random_hf_state,
    )

    state, model = build_trainable(TINY, ParallelConfig(), random_hf_state(TINY), lr=3e-3)
    batches = dp_share(lm_microbatches(4, 2, 16, TINY.vocab_size), state.dp_rank, state.dp_size)

    def step():
        return model.train_step(batches, lm_loss_fn(state.tp_group)).metrics["loss"]

    if world == 2:
        for _ in range(steps_before):
            step()
        save_checkpoint(root, steps_before, state, {"actor": model})
    else:
        load_latest_checkpoint(root, state, {"actor": model})
    return step(), model.gather_hf_state()


def test_a_dp_change_resumes_model_and_optimizer_state(tmp_path):
    root = str(tmp_path / "ckpt")
    loss2, params2 = run_world(_dp_change, 2, root, 3)[0]
    loss1, params1 = run_world(_dp_change, 1, root, 3)[0]
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for name, value in params2.items():
        torch.testing.assert_close(params1[name], value, atol=1e-6, rtol=1e-5)


def _ppo_dp_change(rank, world, save_dir):
    from hpc_rlhf.trainer.ppo_run import run_ppo
    from tests.trainer.test_ppo import make_cfg

    steps = 1 if world == 2 else 2
    cfg = make_cfg(ppo={"steps": steps, "save_dir": save_dir, "micro_batch_size_per_rank": 4})
    return run_ppo(cfg)


def test_a_ppo_run_saved_with_dp2_resumes_with_dp1(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    run_world(_ppo_dp_change, 2, save_dir)
    resumed = run_world(_ppo_dp_change, 1, save_dir)[0]
    assert [h["step"] for h in resumed] == [2]
    assert all(v == v for v in resumed[0].values())  # no NaN
    with open(os.path.join(save_dir, "step_000002", "meta.json")) as fh:
        assert json.load(fh)["layout"]["dp"] == 1
