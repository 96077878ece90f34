"""What users read of a run: ``metrics.jsonl``, the TensorBoard events and the progress line.

* A tiny PPO run's ``metrics.jsonl`` has one record per step, numbered 1..N, with the
  progress keys (``ppo_run.PROGRESS_KEYS``) and the six stage timings the README lists,
  every value finite, and the same numbers ``run_ppo`` returned.
* Its TensorBoard events, read back with tensorboard's own ``EventAccumulator``, hold every
  metric as a scalar at steps 1..N with the JSONL values (TensorBoard stores float32).
* A resumed sink's TensorBoard history shows the redone steps' new values, not the
  records of the crashed run (``purge_step``), like the JSONL.
* The progress line: bar, step/total, the chosen metrics, elapsed time and the ETA
  ``elapsed / steps done in this process x steps left``, on a controlled clock.

(The NaN stop naming the last good checkpoint is asserted by
``tests/trainer/test_ppo.py::test_nan_reward_stops_naming_its_rule_and_keeps_the_checkpoint``.)
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from tests.dist import run_world

STEPS = 3
STAGES = ("prompts", "generate", "score", "advantages", "train", "handoff")

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed: MetricsSink writes JSONL only",
)


def _ppo(rank, world, out_dir):
    from hpc_rlhf.trainer.ppo_run import run_ppo
    from tests.trainer.test_ppo import make_cfg

    cfg = make_cfg(
        ppo={
            "steps": STEPS,
            "rollout_batch_size": 4,
            "n_samples_per_prompt": 2,
            "micro_batch_size_per_rank": 4,
            "mini_batches_per_rollout": 2,
        },
        generation={"max_new_tokens": 6},
    )
    return run_ppo(cfg, out_dir)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A 3-step tiny PPO run (1 process): its out_dir and the history run_ppo returned."""
    out_dir = str(tmp_path_factory.mktemp("ppo_out"))
    history = run_world(_ppo, 1, out_dir)[0]
    return out_dir, history


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL file, one per line (a blank or torn line fails the test)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``log_dir``: [(step, value)] in step order,
    as TensorBoard shows them (orphaned events of a restarted run purged)."""
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]
    }


def test_metrics_jsonl_has_one_finite_record_per_step_with_the_documented_keys(ppo_run):
    from hpc_rlhf.trainer.ppo_run import PROGRESS_KEYS

    out_dir, history = ppo_run
    records = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    documented = {*PROGRESS_KEYS, *(f"time_{s}" for s in STAGES), "time_step", "step"}
    keys = set(records[0])
    assert documented <= keys, f"missing {documented - keys}"
    for record in records:
        assert set(record) == keys, f"step {record['step']} has other keys"
        bad = {
            k: v
            for k, v in record.items()
            if not (isinstance(v, (int, float)) and math.isfinite(v))
        }
        assert not bad, f"step {record['step']}: not finite numbers {bad}"
        assert record["time_step"] > 0 and record["tokens_per_s"] > 0
    assert records == history  # the file holds what the run returned, nothing rounded


def test_tensorboard_events_hold_every_metric_at_every_step(ppo_run):
    out_dir, history = ppo_run
    scalars = tensorboard_scalars(os.path.join(out_dir, "tb"))
    assert set(scalars) == set(history[0]) - {"step"}
    for tag, points in scalars.items():
        assert [step for step, _ in points] == list(range(1, STEPS + 1)), tag
        for (step, value), record in zip(points, history):
            assert value == np.float32(record[tag]), f"{tag} at step {step}"


def test_a_resumed_sink_shows_the_redone_steps_in_tensorboard(tmp_path):
    from hpc_rlhf.utils.logging import MetricsSink

    first = MetricsSink(str(tmp_path), enabled=True)
    for step in range(1, 5):  # a run that crashed after step 4, last saved at step 2
        first.write(step, {"loss": float(step)})
    first.close()
    resumed = MetricsSink(str(tmp_path), enabled=True)
    resumed.begin(2)
    for step in (3, 4, 5):
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()
    expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert tensorboard_scalars(str(tmp_path / "tb")) == {"loss": expected}
    jsonl = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in jsonl] == expected


# ----------------------------------------------------------------------------- progress

LINE = re.compile(
    r"^\[(?P<bar>[#.]{20})\] (?P<step>\d+)/(?P<total>\d+) (?P<shown>.*?) ?"
    r"\((?P<elapsed>\d+)s, eta (?P<eta>\d+)s\)$"
)


def parse_progress(line: str) -> dict:
    """The fields of a progress line: filled bar cells, step, total, the shown metrics
    (name -> text), elapsed and ETA seconds."""
    match = LINE.match(line)
    assert match, f"not a progress line: {line!r}"
    shown = dict(item.split("=", 1) for item in match["shown"].split())
    return {
        "filled": match["bar"].count("#"),
        "step": int(match["step"]),
        "total": int(match["total"]),
        "shown": shown,
        "elapsed": int(match["elapsed"]),
        "eta": int(match["eta"]),
    }


class Clock:
    """A ``time.perf_counter`` stand-in the test sets."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "start_step,step,elapsed,eta",
    [
        (0, 5, 50.0, 350),  # fresh: 10 s a step, 35 steps left
        (10, 14, 20.0, 130),  # resumed at 10: 4 steps in 20 s, 26 left
        (10, 10, 3.0, 90),  # nothing done yet: elapsed counts as one step
        (0, 40, 100.0, 0),  # last step
    ],
)
def test_progress_line_shows_the_metrics_and_the_eta_of_the_steps_left(
    monkeypatch, capsys, start_step, step, elapsed, eta
):
    from hpc_rlhf.utils import logging as hlog

    clock = Clock(1000.0)
    monkeypatch.setattr(hlog.time, "perf_counter", clock)
    progress = hlog.Progress(total=40, enabled=True, start_step=start_step)
    clock.now += elapsed
    metrics = {"reward_mean": 0.123456, "kl": 2.5e-05, "unshown": 1.0}
    progress.update(step, metrics, ("reward_mean", "kl", "absent"))
    fields = parse_progress(capsys.readouterr().out.rstrip("\n"))
    assert fields == {
        "filled": step // 2,  # 20 cells for 40 steps
        "step": step,
        "total": 40,
        "shown": {"reward_mean": "0.1235", "kl": "2.5e-05"},
        "elapsed": round(elapsed),
        "eta": eta,
    }
    silent = hlog.Progress(total=40, enabled=False)  # ranks other than 0
    silent.update(step, metrics, ("kl",))
    assert capsys.readouterr().out == ""
