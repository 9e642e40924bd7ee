"""One run, top to bottom: ingest -> split -> vectorize -> build -> fit -> evaluate, recorded as one MLflow run.

`train(cfg)` returns (metrics, objects): the final metrics (what a sweeper optimizes) and the products.
The stages are plain functions (pipeline/ingest.py ... evaluate.py) that know nothing of Hydra or MLflow;
this module calls each by name, in order, through `step` (pipeline/steps.py: its seconds, its terminal line,
the stage cache), and hands each product to the run (pipeline.tracking, the one place that speaks to MLflow).
The run is opened first, so that what MLflow shows is what happened: its start is the process's, each epoch
is recorded as it ends, and an interrupt ends it KILLED. The speed switches (pipeline/speed/) leave this
story as it reads. From a notebook: `train(config.configure("fit.epochs=10"))`; the process is left as it
was found (no signal handler, environment variable, thread, plotting backend or figure of its own stays behind;
the random generators it seeds and MLflow's tracking URI and experiment are put back).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pipeline
from pipeline import build, config, evaluate, fit, ingest, seeds, speed, split, trial
from pipeline.build import Encoded
from pipeline.config import PipelineConfig
from pipeline.speed.collection import COLLECTION
from pipeline.steps import Steps

log = logging.getLogger(__name__)


def check(cfg: PipelineConfig) -> None:
    """What can be found wrong before any work, TensorFlow or run: the data's path (unless it is to be
    downloaded), the cache's folder (writable) and the tracking store. An error here records nothing."""
    from pipeline.tracking import server  # (see train: this module is imported without MLflow)

    ingest.check(cfg.ingest)  # ValueError: a source not of ingest.SOURCES, or no ingest.path where it needs one
    source = ingest.SOURCES[cfg.ingest.source]
    if source.local and not (source.downloads and cfg.ingest.download):
        ingest.locate(cfg.ingest)  # FileNotFoundError naming ingest.path
    if cfg.stage_cache or cfg.fit.compile_cache:
        writable(cfg.cache_dir, "cache_dir", "or stage_cache=false fit.compile_cache=false")
    server.check_reachable(config.tracking_uri(cfg.tracking))


def writable(folder: str, setting: str, otherwise: str) -> None:
    """A PermissionError naming the folder and the fix, unless `folder` (or the folder it will be made in) is writable."""
    path = Path(folder).expanduser().absolute()
    there = next(p for p in (path, *path.parents) if p.exists())
    if not there.is_dir() or not os.access(there, os.W_OK):
        raise PermissionError(f"cannot write {there}, where {setting}={folder} keeps its files: run from a folder you "
                              f"can write, or set {setting}=<a folder you can write> ({otherwise})")


def start_tensorflow(cfg: PipelineConfig, aside: bool = False) -> None:
    """Import TensorFlow (through Keras) as this run needs it: the thread limits are read once, when
    TensorFlow starts; a later job in the same process keeps them. `aside`: budgets are recorded beside the
    training (tracking/budgets.py); under the command line, with sweep.threads unset, TensorFlow leaves their
    thread a core (its threads: the cores less one)."""
    from pipeline.workers import cores

    fresh = "tensorflow" not in sys.modules
    threads = cfg.sweep.threads or (max(cores() - 1, 1) if aside and pipeline.COMMAND_LINE else None)
    try:
        import tensorflow as tf

        if threads:
            try:  # jobs side by side share the cores instead of oversubscribing them
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:
                log.debug("TensorFlow already started; thread limits stay as they were")
        import keras  # noqa: F401
    finally:  # (only where python -m pipeline paused collection: freeze_gc)
        COLLECTION.resume(freeze=fresh)


@dataclass
class Data:
    """What the data stages hand on: the reviews' source, digest, counts and labels (Reviews.meta), the
    split's sizes and the arrays (None where cfg.stages stops before), and the stage cache's hits."""
    reviews: dict
    sizes: dict[str, int] | None
    encoded: Encoded | None
    cache: dict[str, str]


def prepare(cfg: PipelineConfig, step: Steps) -> Data:
    """ingest -> split -> vectorize, as far as cfg.stages goes."""
    reviews = step("ingest", ingest.ingest, cfg.ingest, cfg.seed)
    parts = step("split", split.split, reviews.frame, cfg.split, cfg.seed) if "split" in cfg.stages else None
    encoded = step("vectorize", build.vectorize, parts, cfg.build, reviews.table) if "build" in cfg.stages else None
    return Data(reviews.meta(), parts and parts.sizes(), encoded, dict(step.cache))


def train(cfg: PipelineConfig, budgets: Sequence[PipelineConfig] = (),
          reference: PipelineConfig | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the pipeline once, tracked. Returns (metrics, objects). `budgets`: in a sweep, the settings of shorter
    fit.epochs budgets of this job, each recorded as its own run when training reaches it (tracking/budgets.py);
    `reference`: the sweep's early-stopping reference job (these settings with early stopping), recorded alike.
    (A sweep's job whose longest budget is recorded beside the next job returns the curves' metrics alone.)"""
    from pipeline import tracking  # MLflow, imported here: the data worker imports this module for prepare() alone
    from pipeline.tracking.budgets import SharedRuns

    check(cfg)
    step = Steps(cfg, speed.stage_cache(cfg))  # each stage's call below: timed, its line told, through the stage cache
    metrics: dict[str, float] = {}
    shared = bool(budgets) or reference is not None
    runs = SharedRuns(cfg, list(budgets), step, reference) if shared else tracking.TrackedRun(cfg, step.seconds)
    with seeds.kept(), speed.ahead(cfg, prepare, step) as prepared, runs as run, \
            speed.xla_cache(cfg):  # (the caller's random generators put back at the end: seeds.py)
        if "build" in cfg.stages:
            step("start_tensorflow", start_tensorflow, cfg, shared)
        COLLECTION.resume(freeze=False)  # (on already, unless cfg.stages ends before build)
        data = prepared()  # prepare(cfg, step), made here or by the worker that started with the run
        run.data(data)
        objects: dict[str, Any] = {"data": data}
        if "build" in cfg.stages:
            encoded = data.encoded
            make = functools.partial(build.build_model, cfg.build, encoded.input_size, encoded.x_train.shape[1],
                                     cfg.seed, train=(encoded.x_train, encoded.y_train))
            model = step("build", make)
            run.model_summary(build.summary(model), model.count_params(), fit.device())
            objects.update(encoded=encoded, model=model)
        if "fit" in cfg.stages:
            pruning = trial.report_to_study(cfg.sweep)  # in an Optuna search: report each epoch, be pruned
            # what follows the fit; a shared training's shorter budgets get it as training reaches them (budgets.py),
            # scoring each epoch's weights on the test split once
            then = functools.partial(record, model=model, encoded=encoded, scored={})
            shorter = run.budgets(model, then, make) if shared else {}  # (`make`: a model to record budgets with)
            fitted = step("fit", fit.fit, model, encoded, cfg.fit, cfg.seed, callbacks=[run.epoch_logger(), *pruning],
                          **shorter)
            if shared and run.later:  # (a sweep's job: its last budget recorded like the others, beside the next job)
                run.reached(fitted)
                done, products = curves(fitted), {"fitted": fitted}
            else:
                done, products = then(run, step, cfg, fitted)
            metrics.update(done)
            objects.update(products)
        prepared.written()  # the stage cache's new entries in place (the data worker writes them after the handover)
        run.complete()
    return metrics, objects


def curves(fitted) -> dict[str, float]:
    """The curves' summary: the lowest validation loss and the highest validation accuracy."""
    history = fitted.history
    return dict(val_loss=float(history["val_loss"].min()), val_accuracy=float(history["val_accuracy"].max()))


def record(run, step: Steps, cfg: PipelineConfig, fitted, model, encoded,
           scored: dict) -> tuple[dict[str, float], dict[str, Any]]:
    """What follows the fit, into `run`: the curves' summary, then the best and the last epoch scored on the test
    split (`scored`: the test probabilities of the epochs scored so far) and the served model logged. (metrics,
    objects). A shorter budget of a shared training gets the same."""
    run.fitted(fitted)
    metrics = curves(fitted)
    objects: dict[str, Any] = {"fitted": fitted}
    if "evaluate" in cfg.stages:
        kept = step("evaluate", evaluate.checkpoints, model, encoded, fitted, cfg.evaluate, scored)  # best and last
        run.evaluation(kept)
        objects.update(evaluation=kept.evaluation, checkpoints=kept)
        metrics.update(kept.evaluation.metrics)
        if cfg.evaluate.log_model:  # the served checkpoint as a raw-text model (`model` ends holding it)
            step("log_model", run.log_models, model, encoded, cfg, kept)
    return metrics, objects
