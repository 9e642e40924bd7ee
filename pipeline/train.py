"""One run, top to bottom: ingest -> split -> build -> fit -> evaluate, recorded as one MLflow run.

`train(cfg)` returns (metrics, objects): the final metrics (what a sweeper optimizes) and the products.
The stages are plain functions (pipeline/ingest.py ... evaluate.py) that know nothing of Hydra or
MLflow; this module calls them in order and hands each product to the run (pipeline.tracking, the one
place that speaks to MLflow). The run is opened first, so that what MLflow shows is what happened: its
start is the process's, each epoch is recorded as it ends, and an interrupt ends it KILLED.

One speed switch lives here, measured with it off by `python benchmarks/bench.py --ablate`: `prepare_ahead`
(the data prepared in a worker process while TensorFlow loads). `freeze_gc` is the command line's
(pipeline/collection.py), `stage_cache` pipeline/cache.py's, `fit.loop` and `fit.compile_cache` the fit's.
From a notebook: `train(config.configure("fit.epochs=10"))`; the process is left as it was found (no signal
handler, environment variable or thread of its own stays behind).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pipeline import build, config, evaluate, fit, ingest, search, tracking
from pipeline.tracking import checkpoints, server
from pipeline.cache import Prepared, clocked, prepare
from pipeline.collection import COLLECTION
from pipeline.config import PipelineConfig
from pipeline.console import stage

log = logging.getLogger(__name__)


def check(cfg: PipelineConfig) -> None:
    """What can be found wrong before any work, TensorFlow or run: the data's path (unless it is to be
    downloaded) and the tracking server. An error here records nothing."""
    if cfg.ingest.source != "keras" and not (cfg.ingest.source == "archive" and cfg.ingest.download):
        ingest.locate(cfg.ingest)  # FileNotFoundError naming ingest.path
    server.check_reachable(config.tracking_uri(cfg.tracking))


def start_tensorflow(cfg: PipelineConfig) -> None:
    """Import TensorFlow (through Keras) as this run needs it: the thread limits are read once, when
    TensorFlow starts; a later job in the same process keeps them."""
    fresh = "tensorflow" not in sys.modules
    try:
        import tensorflow as tf

        if cfg.sweep.threads:
            try:  # jobs side by side share the cores instead of oversubscribing them
                tf.config.threading.set_intra_op_parallelism_threads(cfg.sweep.threads)
                tf.config.threading.set_inter_op_parallelism_threads(cfg.sweep.threads)
            except RuntimeError:
                log.debug("TensorFlow already started; thread limits stay as they were")
        import keras  # noqa: F401
    finally:  # (only where python -m pipeline paused collection: freeze_gc)
        COLLECTION.resume(freeze=fresh)


def xla_cache(cfg: PipelineConfig):
    """XLA's compiled programs kept in cache_dir while the run compiles (fit.compile_cache)."""
    return fit.compile_cache(cfg.cache_dir) if cfg.fit.jit_compile and cfg.fit.compile_cache else nullcontext()


@contextmanager
def preparing(cfg: PipelineConfig):
    """Yields a function that returns the run's Prepared data. With prepare_ahead (and TensorFlow not
    loaded yet) the data stages start at once in a worker process, a fresh interpreter (safe whatever
    threads run here), while this process opens the run and imports TensorFlow; the worker is stopped
    as soon as its result is in, or when the run ends first. A spawned worker imports the main module
    again: only a module started with -m (`python -m pipeline`, whose code is guarded) is safe to."""
    main = sys.modules["__main__"]
    if not (cfg.prepare_ahead and "build" in cfg.stages and "tensorflow" not in sys.modules
            and getattr(main, "__spec__", None) is not None and multiprocessing.parent_process() is None):
        yield lambda: prepare(cfg)
        return
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=signal.signal,
                                                       initargs=(signal.SIGINT, signal.SIG_IGN))  # Ctrl-C is the run's

    def result() -> Prepared:
        try:
            return pending.get()
        finally:
            pool.terminate()

    try:
        pending = pool.apply_async(prepare, (cfg,))
        log.info("ingest, split, vectorize: in a worker process while TensorFlow loads")
        yield result
    finally:
        pool.terminate()


def train(cfg: PipelineConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the pipeline once, tracked. Returns (metrics, objects)."""
    check(cfg)
    with preparing(cfg) as prepared, tracking.TrackedRun(cfg) as run, xla_cache(cfg):
        seconds: dict[str, float] = {}
        if "build" in cfg.stages:
            with clocked(seconds, "start_tensorflow"):
                start_tensorflow(cfg)
            stage("start TensorFlow", seconds["start_tensorflow"])
        COLLECTION.resume(freeze=False)  # (on already, unless cfg.stages ends before build)
        data = prepared()
        seconds.update(data.seconds)
        for line in data.lines():
            stage(*line)
        run.data(data)
        objects: dict[str, Any] = {"prepared": data}
        metrics: dict[str, float] = {}
        try:
            if data.encoded is None:  # cfg.stages ends before build
                run.complete()
                return metrics, objects
            with clocked(seconds, "build"):
                encoded = data.encoded
                model = build.build_model(cfg.build, encoded.input_size, encoded.x_train.shape[1], cfg.seed,
                                          train=(encoded.x_train, encoded.y_train))
            run.model_summary(build.summary(model), model.count_params(), fit.device())
            stage("build", seconds["build"], f"{model.count_params():,} parameters")
            objects.update(encoded=data.encoded, model=model)
            if "fit" in cfg.stages:
                search_trial = search.report_to_study(cfg.sweep)  # in an Optuna search: report each epoch, be pruned
                with clocked(seconds, "fit"):
                    fitted = fit.fit(model, data.encoded, cfg.fit, cfg.seed, callbacks=[run.epoch_logger(), *search_trial])
                run.fitted(fitted)
                objects["fitted"] = fitted
                done = fitted.summary()
                epochs, lowest, at = done["epochs_trained"], done["best_val_loss"], done["best_val_loss_epoch"]
                stage("fit", seconds["fit"], f"{epochs} epoch{'s' * (epochs != 1)}, lowest val_loss {lowest:.4f} "
                                             f"at epoch {at}")
                metrics.update(val_loss=lowest, val_accuracy=float(fitted.history["val_accuracy"].max()))
            if "evaluate" in cfg.stages:
                with clocked(seconds, "evaluate"):  # the best and the last epoch; `model` ends as the served one
                    kept = evaluate.checkpoints(model, data.encoded, fitted, cfg.evaluate)
                    evaluation = kept.evaluation
                    run.evaluation(evaluation)
                    checkpoints.record(kept)
                objects.update(evaluation=evaluation, checkpoints=kept)
                metrics.update(evaluation.metrics)
                stage("evaluate", seconds["evaluate"], kept.line())
                if cfg.evaluate.log_model:
                    with clocked(seconds, "log_model"):
                        checkpoints.log_models(run, model, data.encoded, cfg, kept)
                    stage("log_model", seconds["log_model"], f"{kept.served.role} (epoch {kept.served.epoch}) as the "
                          f"raw-text model, served as it was tested; {1 + bool(kept.other) + len(kept.every)} checkpoint(s)")
            run.complete()
            return metrics, objects
        finally:
            run.stage_seconds(seconds)
