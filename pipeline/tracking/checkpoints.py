"""A run's checkpoints as MLflow 3 LoggedModels: the best and the last epoch (one model when they coincide),
and every fit.checkpoint_every-th epoch, each logged with its step (the epoch), a `checkpoint` tag, a name
that says which and whose it is (`best-epoch-25-served of <run>`), and only its own values linked to it
(model_id): the epoch's curves at its step and its test metrics, so each column of the Models tab is its own.
The served one is registered and the run's `model_uri` tag. The run's own metrics and charts stay as they
were (docs/checkpoints.md).
"""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile

import mlflow
from mlflow.entities import Metric

from pipeline.signals import SIGNALS
from pipeline.tracking.epochs import CURVES

log = logging.getLogger(__name__)
LINKED = CURVES  # the per-epoch curves linked to a checkpoint, at its epoch (epoch_seconds: of the run, not the model)
BATCH = 1000  # log_batch takes at most 1000 metrics a call
MLMODEL = "MLmodel"  # an MLflow model's description file
NOT_IN_NAMES = str.maketrans({c: "_" for c in "/:.%\"'"})  # what MLflow 3.17 refuses in a LoggedModel's name


@SIGNALS.held()
def record(kept) -> None:
    """best.epoch, best.test_accuracy, best.test_loss and the same for last, as run metrics: the cost of
    training past the best epoch, on every run (the run's test_* are the served checkpoint's)."""
    mlflow.log_metrics(kept.summary())


def log_models(run, model, encoded, cfg, kept) -> str:
    """Log every checkpoint of `kept` (pipeline.evaluate.Checkpoints) as a LoggedModel of `run`, the served one
    first, through run.log_model (registered, MLflow's serving check of the input example); `model` ends
    holding the served weights. Returns the served model's URI."""
    if run.epochs is not None:
        run.epochs.close()  # every epoch's points are in the store, to be linked
    client = mlflow.MlflowClient()
    # A file store appends a point logged again (the SQL stores keep one): there, only MLflow's own linking
    uri = mlflow.get_tracking_uri()
    keeps_once = not (uri.startswith("file:") or "://" not in uri)
    history = {key: client.get_metric_history(run.run_id, key) for key in LINKED} if keeps_once else {}
    run_name = client.get_run(run.run_id).info.run_name
    served = kept.served
    model.set_weights(served.weights)
    info = run.log_model(model, encoded, cfg, step=served.epoch, tags={"checkpoint": served.role},
                         name=model_name(run_name, served, served=True))
    # The run's own test points (run.evaluation logged them): the same points again, linked, are not new ones
    tested = [max((p for p in client.get_metric_history(run.run_id, key) if p.step == 0), key=lambda p: p.timestamp)
              for key in served.metrics] if keeps_once else []
    _link(client, run.run_id, info.model_id, tested)  # (log_model linked the points at its step)
    mlflow.set_tag("model_uri", info.model_uri)  # what pipeline.score, a sweep's champion and users follow
    others = kept.every + ([kept.other] if kept.other else [])
    if others:
        with tempfile.TemporaryDirectory() as folder:
            layout = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=f"{folder}/served")
            for checkpoint in others:
                model.set_weights(checkpoint.weights)
                model_id = _log_alike(client, run.run_id, model, layout, f"{folder}/{checkpoint.epoch}", checkpoint,
                                      model_name(run_name, checkpoint))
                # The test metrics as they were measured, before the served one's (which stay the run's latest)
                tested = [Metric(key, value, int(checkpoint.measured * 1000), 0) for key, value in checkpoint.metrics.items()]
                _link(client, run.run_id, model_id, _at(history, checkpoint.epoch) + tested)
        model.set_weights(served.weights)
    return info.model_uri


@SIGNALS.held()
def _log_alike(client, run_id: str, model, layout: str, folder: str, checkpoint, name: str) -> str:
    """A checkpoint as a LoggedModel laid out as the served one (`layout`, as log_model wrote it: the same
    model code, vocabulary, signature, input example and environment) with this checkpoint's classifier,
    its MLmodel naming the new model. MLflow's serving check ran on the served one; the files it checks
    are the same but for the weights. Cheaper than log_model: no environment inference, no second check."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, tags={"checkpoint": checkpoint.role},
                                            params=client.get_run(run_id).data.params)  # as log_model does
    try:  # (as MLflow's log_model does: a model whose logging failed is not left PENDING)
        shutil.copytree(layout, folder)
        described = Model.load(f"{folder}/{MLMODEL}")
        classifier = f"{folder}/{described.flavors['python_function']['artifacts']['classifier']['path']}"
        model.save(classifier)
        described.model_id = described.model_uuid = logged.model_id
        described.artifact_path = logged.artifact_location
        described.utc_time_created = str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
        described.save(f"{folder}/{MLMODEL}")
        client.log_model_artifacts(logged.model_id, folder)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=checkpoint.epoch)])
    except Exception:
        mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def model_name(run_name: str, checkpoint, served: bool = False) -> str:
    """What the Models tab names a checkpoint: its role and epoch, whether it is served, and its run
    (`best-epoch-25-served of tutorial`, `last-epoch-40 of tutorial`, `epoch-10 of tutorial`), so that a sweep's
    rows tell themselves apart, and a model listed without its run says whose it is. The role comes first:
    the UI's name column shows the first 25 characters or so."""
    role = "" if checkpoint.role == "epoch" else checkpoint.role.replace(",", "+") + "-"
    return f"{role}epoch-{checkpoint.epoch}{'-served' * served} of {run_name[:200].translate(NOT_IN_NAMES)}"


def _at(history: dict, epoch: int) -> list:
    """The run's per-epoch points at `epoch`: a checkpoint's own values, one per curve."""
    return [point for points in history.values() for point in points if point.step == epoch]


@SIGNALS.held()
def _link(client, run_id: str, model_id: str, points: list) -> None:
    """Link `points` to the model: logged again with its model_id. The SQL store keeps a run's point once
    (its key is key, step, timestamp and value), so the run's history gains no point it had; the model's
    metrics gain them all."""
    linked = [Metric(p.key, p.value, p.timestamp, p.step, model_id=model_id, run_id=run_id) for p in points]
    for start in range(0, len(linked), BATCH):
        client.log_batch(run_id, metrics=linked[start:start + BATCH])
