"""Experiment trackers (``tracking.backends``): a real pre-training run under torchrun logs
its config and every step's metrics to MLflow (a local file store, read back with MLflow's
own client) and to W&B in offline mode (the run's ``.wandb`` transaction log, decoded with
W&B's own protobuf records), the same values as ``metrics.jsonl``; a resumed run continues
the same MLflow run."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from hpc_rlhf.config import ConfigError, TrackingConfig
from tests.dist import torchrun_cli


@pytest.fixture(autouse=True)
def _mlflow_file_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the test reads the file store


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def wandb_records(path: str) -> list:
    """The records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of
    32 KiB holding (crc32, length, type) framed chunks of serialised ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    """A W&B record item's key (``key``, or ``nested_key`` joined, as newer W&B writes)."""
    return item.key or "/".join(item.nested_key)


def _run(tmp_path, *overrides):
    return torchrun_cli(
        "pretrain",
        "examples/configs/tiny_cpu.yaml",
        "--out-dir",
        str(tmp_path / "out"),
        "train.steps=3",
        "train.log_interval=1",
        f"train.save_dir={tmp_path / 'ckpt'}",
        "tracking.backends=[mlflow, wandb]",
        "tracking.project=tiny",
        "parallel.pipeline_model_parallel_size=1",
        *overrides,
        nproc=2,
    )


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 3-step run logging to both trackers, shared by the tests (a torchrun launch and
    the trackers' imports cost ~12 s); a test that writes to it works on a copy."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the tests read the file store
        result = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path


def test_mlflow_and_wandb_get_the_config_and_every_steps_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    out = tracked_run / "out"
    records = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    client = MlflowClient("file:" + str(out / "mlruns"))
    run_id = (out / "tracking" / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.data.params["model.hidden_size"] == "64" and run.info.status == "FINISHED"
    assert run.data.params["tracking.project"] == "tiny"
    for key in records[0]:
        if key == "step":
            continue
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in records]

    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {_key(i): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({_key(i): json.loads(i.value_json) for i in updates})
    assert config["model"]["hidden_size"] == 64 and config["tracking"]["project"] == "tiny"
    assert sorted(history) == [1, 2, 3]
    for r in records:
        assert history[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-12)


def test_a_resumed_run_continues_the_same_mlflow_run(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    for part in ("out", "ckpt"):
        shutil.copytree(tracked_run / part, tmp_path / part)
    out = tmp_path / "out"
    run_id = (out / "tracking" / "mlflow_run_id").read_text()
    again = _run(tmp_path, "tracking.backends=[mlflow]", "train.steps=5")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "tracking" / "mlflow_run_id").read_text() == run_id
    client = MlflowClient("file:" + str(out / "mlruns"))
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5]
    assert len(os.listdir(out / "mlruns")) >= 1


@pytest.mark.parametrize(
    "cfg, match",
    [
        (TrackingConfig(backends=("neptune",)), "'neptune' is not one of"),
        (TrackingConfig(wandb_mode="dryrun"), "wandb_mode='dryrun'"),
    ],
)
def test_bad_tracking_settings_are_named(cfg, match):
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"wandb package is not installed \(pip install"):
        TrackingConfig(backends=("wandb",)).validate()
