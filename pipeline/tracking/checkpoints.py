"""A run's checkpoints as MLflow 3 LoggedModels: the best and the last epoch (one model when they coincide),
and every fit.checkpoint_every-th epoch, each logged with its step (the epoch), a `checkpoint` tag, its
epoch curves and test metrics linked to it (model_id). The served one is the run's `model`: registered,
the `model_uri` tag. The run's own metrics and charts stay as they were (docs/checkpoints.md).
"""

from __future__ import annotations

import logging
import warnings

import mlflow
from mlflow.entities import Metric

from pipeline.signals import SIGNALS
from pipeline.tracking import CURVES

log = logging.getLogger(__name__)
LINKED = CURVES + ("epoch_seconds",)  # the per-epoch metrics a checkpoint's page shows, up to its epoch
BATCH = 1000  # log_batch takes at most 1000 metrics a call


@SIGNALS.held()
def record(kept) -> None:
    """best.epoch, best.test_accuracy, best.test_loss and the same for last, as run metrics: the cost of
    training past the best epoch, on every run (the run's test_* are the served checkpoint's)."""
    mlflow.log_metrics(kept.summary())


def log_models(run, model, encoded, cfg, kept) -> str:
    """Log every checkpoint of `kept` (pipeline.evaluate.Checkpoints) as a LoggedModel of `run`, the served
    one last; `model` ends holding the served weights. Returns the served model's URI."""
    mlflow.flush_async_logging()  # the epochs' points are in the store: log_model links its step's, we the rest
    client = mlflow.MlflowClient()
    history = {key: client.get_metric_history(run.run_id, key) for key in LINKED}
    for checkpoint in kept.every + ([kept.other] if kept.other else []):
        model.set_weights(checkpoint.weights)
        name = checkpoint.role if checkpoint.role != "epoch" else f"epoch-{checkpoint.epoch}"
        with warnings.catch_warnings():  # MLflow's advice to give an input example: the served model has it
            warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
            info = run.log_model(model, encoded, cfg, served=False, name=name, step=checkpoint.epoch,
                                 tags={"checkpoint": checkpoint.role})
        # The test metrics as they were measured, before the served one's (whose points stay the run's latest)
        tested = [Metric(key, value, int(checkpoint.measured * 1000), 0) for key, value in checkpoint.metrics.items()]
        _link(client, run.run_id, info.model_id, _curve(history, checkpoint.epoch) + tested)
    served = kept.served
    model.set_weights(served.weights)
    info = run.log_model(model, encoded, cfg, step=served.epoch, tags={"checkpoint": served.role})
    # The run's own test points (run.evaluation logged them): the same points again, linked, are not new ones
    tested = [max((p for p in client.get_metric_history(run.run_id, key) if p.step == 0), key=lambda p: p.timestamp)
              for key in served.metrics]
    _link(client, run.run_id, info.model_id, _curve(history, served.epoch) + tested)
    mlflow.set_tag("model_uri", info.model_uri)  # what pipeline.score, a sweep's champion and users follow
    return info.model_uri


def _curve(history: dict, epoch: int) -> list:
    """The run's per-epoch points before `epoch` (log_model links the points at its step itself)."""
    return [point for points in history.values() for point in points if point.step < epoch]


@SIGNALS.held()
def _link(client, run_id: str, model_id: str, points: list) -> None:
    """Link `points` to the model: logged again with its model_id. The SQL store keeps a run's point once
    (its key is key, step, timestamp and value), so the run's history gains no point it had; the model's
    metrics gain them all."""
    linked = [Metric(p.key, p.value, p.timestamp, p.step, model_id=model_id, run_id=run_id) for p in points]
    for start in range(0, len(linked), BATCH):
        client.log_batch(run_id, metrics=linked[start:start + BATCH])
