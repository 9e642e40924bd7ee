"""One run, top to bottom: ingest -> split -> build -> fit -> evaluate, recorded as one MLflow run.

`train(cfg)` returns (metrics, objects): the final metrics (what a sweeper optimizes) and the products.
The stages are plain functions (pipeline/ingest.py ... evaluate.py) that know nothing of Hydra or
MLflow; this module calls them in order and hands each product to the run (pipeline.tracking, the one
place that speaks to MLflow). The run is opened first, so that what MLflow shows is what happened: its
start is the process's, each epoch is recorded as it ends, and an interrupt ends it KILLED.

Two speed switches live here, each measured with it off by `python -m pipeline.bench --ablate`:
`prepare_ahead` (the data prepared in a worker process while TensorFlow loads) and `freeze_gc`
(TensorFlow's objects left out of garbage collection). `stage_cache` is pipeline/cache.py's;
`fit.loop` and `fit.compile_cache` are the fit's.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import sys
from contextlib import contextmanager
from typing import Any

from pipeline import build, evaluate, fit, tracking
from pipeline.tracking import checkpoints
from pipeline.console import stage
from pipeline.cache import Prepared, clocked, prepare
from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


def start_tensorflow(cfg: PipelineConfig) -> None:
    """Import TensorFlow (through Keras) as this run needs it: XLA's compilation cache and the thread
    limits are read once, when TensorFlow starts; a later job in the same process keeps them."""
    fresh = "tensorflow" not in sys.modules
    if cfg.fit.jit_compile and cfg.fit.compile_cache:
        fit.use_compile_cache(cfg.cache_dir)
    frozen = cfg.freeze_gc and fresh
    if frozen:
        gc.disable()  # nothing TensorFlow and Keras create at import is garbage: no collection meanwhile
    try:  # (python -m pipeline turned collection off from the start, for the other imports too)
        import tensorflow as tf

        if cfg.sweep.threads:
            try:  # jobs side by side share the cores instead of oversubscribing them
                tf.config.threading.set_intra_op_parallelism_threads(cfg.sweep.threads)
                tf.config.threading.set_inter_op_parallelism_threads(cfg.sweep.threads)
            except RuntimeError:
                log.debug("TensorFlow already started; thread limits stay as they were")
        import keras  # noqa: F401
    finally:
        if frozen:
            # ... and none of it is ever freed: out of the collector's sight, no collection walks it again
            # (the one at exit took 3 s of every run). Once a process: later jobs' garbage is collected.
            gc.freeze()
        gc.enable()


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
    pending = pool.apply_async(prepare, (cfg,))
    log.info("ingest, split, vectorize: in a worker process while TensorFlow loads")

    def result() -> Prepared:
        try:
            return pending.get()
        finally:
            pool.terminate()

    try:
        yield result
    finally:
        pool.terminate()


def train(cfg: PipelineConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the pipeline once, tracked. Returns (metrics, objects)."""
    with preparing(cfg) as prepared, tracking.TrackedRun(cfg) as run:
        seconds: dict[str, float] = {}
        if "build" in cfg.stages:
            with clocked(seconds, "start_tensorflow"):
                start_tensorflow(cfg)
            stage("start TensorFlow", seconds["start_tensorflow"])
        gc.enable()  # (on already, unless cfg.stages ends before build)
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
                with clocked(seconds, "fit"):
                    fitted = fit.fit(model, data.encoded, cfg.fit, cfg.seed, callbacks=[run.epoch_logger()])
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

