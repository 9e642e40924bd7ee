"""A run's checkpoints as MLflow 3 LoggedModels: the best and the last epoch (one model when they coincide),
and every fit.checkpoint_every-th epoch, each logged with its step (the epoch), a `checkpoint` tag, a name
that says which and whose it is (`best-epoch-25-served of <run>`), and only its own values linked to it
(model_id): the epoch's curves at its step and its test metrics, so each column of the Models tab is its own.
The served one is registered and the run's `model_uri` tag. The run's own metrics and charts stay as they
were (docs/checkpoints.md). Every write
goes through the run's journal (journal.py), which keeps it on disk while the tracking server is lost.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile

import mlflow
from mlflow.entities import Metric

from pipeline.signals import SIGNALS
from pipeline.tracking import journal as journals
from pipeline.tracking.epochs import CURVES

log = logging.getLogger(__name__)
LINKED = CURVES  # the per-epoch curves linked to a checkpoint, at its epoch (epoch_seconds: of the run, not the model)
MLMODEL = "MLmodel"  # an MLflow model's description file
NOT_IN_NAMES = str.maketrans({c: "_" for c in "/:.%\"'"})  # what MLflow 3.18 refuses in a LoggedModel's name


@SIGNALS.held()
def record(journal, kept) -> None:
    """best.epoch, best.test_accuracy, best.test_loss and the same for last, as run metrics: the cost of
    training past the best epoch, on every run (the run's test_* are the served checkpoint's)."""
    journal.metrics(kept.summary())


def log_models(run, model, encoded, cfg, kept, layout: str | None = None) -> str:
    """Log every checkpoint of `kept` (pipeline.evaluate.Checkpoints) as a LoggedModel of `run`, the served one
    first, through run.log_model (registered, MLflow's serving check of the input example); `model` ends
    holding the served weights. Returns the served model's URI (None while the tracking server is lost).
    `layout`: a folder kept by a shared training (tracking/budgets.py) for its budgets' models: empty, the served
    model's files are put there; filled, the served model is logged alike them (the same code, vocabulary,
    signature, example and environment, whose serving MLflow checked for the first budget) with its own weights."""
    if run.epochs is not None:
        run.epochs.close()  # every epoch's points are written (or kept), to be linked
    journal = run.journal
    # A file store appends a point logged again (the SQL stores keep one): there, only MLflow's own linking
    uri = journal.uri
    keeps_once = not (uri.startswith("file:") or "://" not in uri)
    history = {key: journal.history.get(key, []) for key in LINKED} if keeps_once else {}
    served = kept.served
    model.set_weights(served.weights)
    served_name = model_name(run.run_name, served, served=True)
    others = kept.every + ([kept.other] if kept.other else [])
    with tempfile.TemporaryDirectory() as folder:
        if layout and os.path.isfile(f"{layout}/{MLMODEL}"):
            _log_alike(journal, model, layout, f"{folder}/served", served, served_name,
                       registered=cfg.evaluate.registered_model_name, link_step=True)
            model_uri = f"models:/{journal.models[served_name]}" if served_name in journal.models else None
        else:
            model_uri = run.log_model(model, encoded, cfg, step=served.epoch, tags={"checkpoint": served.role},
                                      name=served_name)
            if layout or others:
                layout = _layout(run, model, encoded, cfg, model_uri, layout or f"{folder}/layout")
        # The run's own test points (run.evaluation logged them): the same points again, linked, are not new ones
        tested = [max((p for p in journal.history[key] if p.step == 0), key=lambda p: p.timestamp)
                  for key in served.metrics] if keeps_once else []
        _link(journal, served_name, tested)  # (log_model linked the points at its step)
        journal.model_uri(served_name)  # the `model_uri` tag: what pipeline.score, a sweep's champion and users follow
        for checkpoint in others:
            model.set_weights(checkpoint.weights)
            name = _log_alike(journal, model, layout, f"{folder}/{checkpoint.epoch}", checkpoint,
                              model_name(run.run_name, checkpoint))
            # The test metrics as they were measured, before the served one's (which stay the run's latest)
            tested = [Metric(key, value, int(checkpoint.measured * 1000), 0) for key, value in checkpoint.metrics.items()]
            _link(journal, name, _at(history, checkpoint.epoch) + tested)
    model.set_weights(served.weights)
    return model_uri


def _megabytes(folder: str) -> float:
    """The size of a model's classifier and vocabulary (the run's `model.size_mb`, as log_model records it)."""
    from pipeline import textmodel

    return sum(os.path.getsize(f"{folder}/artifacts/{name}") for name in (textmodel.CLASSIFIER_FILE,
                                                                          textmodel.VOCABULARY_FILE)) / 1e6


def _layout(run, model, encoded, cfg, model_uri: str | None, path: str) -> str:
    """The served model's files at `path`: as logged (downloaded), or saved here while the server is lost (what a
    download the lost server cut short left at `path` is removed first: the save needs an empty place)."""
    if model_uri is not None:
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=path)
        except Exception as error:
            if not journals.lost(error):
                raise
            run.journal.lose(error)
            shutil.rmtree(path, ignore_errors=True)
    run.save_model(model, encoded, cfg, path)
    return path


@SIGNALS.held()
def _log_alike(journal, model, layout: str, folder: str, checkpoint, name: str, registered: str | None = None,
               link_step: bool = False) -> str:
    """A checkpoint as a LoggedModel laid out as the served one (`layout`, as log_model wrote it: the same
    model code, vocabulary, signature, input example and environment) with this checkpoint's classifier,
    its MLmodel naming the new model. MLflow's serving check ran on the served one; the files it checks
    are the same but for the weights. Cheaper than log_model: no environment inference, no second check.
    `link_step` (a served model): its size recorded at its step (`model.size_mb`) and linked, as log_model does.
    The journal names it in its MLmodel as it logs it (journal.py). Its name."""
    from mlflow.models import Model

    shutil.copytree(layout, folder)
    described = Model.load(f"{folder}/{MLMODEL}")
    classifier = f"{folder}/{described.flavors['python_function']['artifacts']['classifier']['path']}"
    model.save(classifier)
    described.utc_time_created = str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
    described.save(f"{folder}/{MLMODEL}")
    if link_step:  # the served one: its size at its step, before the model links the step's metrics (as log_model)
        journal.metrics({"model.size_mb": _megabytes(folder)}, step=checkpoint.epoch)
    journal.model(folder, name, checkpoint.epoch, {"checkpoint": checkpoint.role}, registered, link_step)
    return name


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
def _link(journal, name: str, points: list) -> None:
    """Link `points` to the run's model `name`: logged again with its model_id. The SQL store keeps a run's
    point once (its key is key, step, timestamp and value), so the run's history gains no point it had; the
    model's metrics gain them all."""
    if points:
        journal.points(points, model=name)
