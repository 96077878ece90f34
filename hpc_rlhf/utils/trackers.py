"""Experiment trackers behind one interface: Weights & Biases and MLflow.

``tracking.backends`` (``config.TrackingConfig``) selects them; JSONL and TensorBoard are
always written (``utils.logging.MetricsSink``). Rank 0 alone opens them, records the run's
whole config when it starts, logs every step's metrics at its step and closes them at the
end. Each run's tracker id is kept in ``OUT_DIR/tracking/`` so a resumed run continues the
same W&B / MLflow run. Both packages are optional (``pip install hpc_rlhf[trackers]``);
asking for one that is not installed is a ``ConfigError`` before work starts
(``TrackingConfig.validate``), never a silent skip.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Protocol

from hpc_rlhf.config import TrackingConfig


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _run_id(out_dir: str, backend: str, make) -> str:
    """The id of this output directory's run on ``backend``: read from
    ``OUT_DIR/tracking/<backend>_run_id``, or made by ``make()`` and written there."""
    path = os.path.join(out_dir, "tracking", f"{backend}_run_id")
    if os.path.exists(path):
        with open(path) as fh:
            return fh.read().strip()
    run_id = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(run_id)
    return run_id


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden_size": 64}}`` -> ``{"model.hidden_size": 64}`` (lists and
    other leaves kept as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class WandbTracker:
    """A W&B run (``tracking.wandb_mode``: offline writes under ``OUT_DIR/wandb``)."""

    def __init__(self, cfg: TrackingConfig, out_dir: str, run_config: dict):
        import wandb

        run_id = _run_id(out_dir, "wandb", lambda: uuid.uuid4().hex[:12])
        # W&B's offline mode does not resume (it records nothing when asked to): a resumed
        # offline run writes a new offline run under the same id, synced as one later
        resume = "allow" if cfg.wandb_mode == "online" else None
        options: dict[str, Any] = {"mode": cfg.wandb_mode, "resume": resume}
        self.run = wandb.init(
            project=cfg.project,
            name=cfg.run_name,
            id=run_id,
            dir=out_dir,
            config=run_config,
            **options,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in ``tracking.mlflow_tracking_uri`` (default: a file store under
    ``OUT_DIR/mlruns``), experiment ``tracking.project``; the config as parameters."""

    def __init__(self, cfg: TrackingConfig, out_dir: str, run_config: dict):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_tracking_uri or "file:" + os.path.abspath(os.path.join(out_dir, "mlruns"))
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told (it would have users run a database
            # server or sqlalchemy); a local run's own directory is what is asked for here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(cfg.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.project)
        )

        def new_run() -> str:
            run = self.client.create_run(experiment_id, run_name=cfg.run_name)
            params = {k: str(v)[:6000] for k, v in flatten(run_config).items()}
            for name, value in params.items():
                self.client.log_param(run.info.run_id, name, value)
            return run.info.run_id

        self.run_id = _run_id(out_dir, "mlflow", new_run)
        self.client.update_run(self.run_id, status="RUNNING")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_BACKENDS: dict[str, Any] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(cfg: TrackingConfig, out_dir: str | None, run_config: dict) -> list[Tracker]:
    """The trackers ``cfg.backends`` selects for a run writing to ``out_dir`` (none
    without one), each started with the run's config."""
    if out_dir is None:
        return []
    return [_BACKENDS[name](cfg, out_dir, run_config) for name in cfg.backends]
