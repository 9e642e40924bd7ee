"""Wiring: run the configured prefix of ingest -> split -> build -> fit -> evaluate inside one tracked run.

`run(cfg)` returns (metrics, objects): the final metrics (what a sweeper optimizes) and the products.
Stages stay free of I/O policy and tracking; this module decides what is cached and hands every
product to `pipeline.tracking`, the one module that speaks to MLflow.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import build, cache, ingest, split, textmodel, tracking
from pipeline.config import PipelineConfig
from pipeline.build import Encoded

log = logging.getLogger(__name__)

INGEST_KEY_SKIPS = ("path", "url", "sha256", "download")  # where a copy lives is not what it holds


class StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def limit_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools, so that jobs running side by side share the cores instead of
    oversubscribing them. Only possible before TensorFlow starts; a later job in the same worker keeps
    the first setting."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.debug("TensorFlow already started; thread limits stay as they were")


def _ingest_key(cfg: PipelineConfig) -> str:
    settings = {k: v for k, v in asdict(cfg.ingest).items() if k not in INGEST_KEY_SKIPS}
    settings["input"] = ingest.input_digest(cfg.ingest)
    settings["seed"] = cfg.seed if cfg.ingest.source == "table" else None
    return cache.make_key("ingest", settings, [ingest])


def _vectorize_key(cfg: PipelineConfig, ingest_key: str) -> str:
    settings = {"ingest": ingest_key, "split": asdict(cfg.split), "seed": cfg.seed,
                "build": {name: getattr(cfg.build, name) for name in build.VECTORIZE_FIELDS}}
    return cache.make_key("vectorize", settings, [ingest, split, build, textmodel])


def prepare(cfg: PipelineConfig, store: cache.StageCache, clock: StageClock, run: tracking.TrackedRun):
    """Ingest, split and vectorize as far as cfg.stages asks, reusing cached products where they match."""
    if cfg.ingest.source != "keras":
        ingest.locate(cfg.ingest)  # download first if needed, so the cache key sees the real file
    ingest_key = _ingest_key(cfg)
    wants_vectors = "build" in cfg.stages
    vector_key = _vectorize_key(cfg, ingest_key) if wants_vectors else None
    ingest_meta = store.meta("ingest", ingest_key)

    if vector_key and ingest_meta is not None:
        with clock("build"):
            hit = store.load("vectorize", vector_key)
        if hit is not None:
            arrays, meta = hit
            log.info("ingest, split, vectorize: reusing cached products (keys %s, %s) from %s",
                     ingest_key, vector_key, store.root)
            run.dataset(ingest_meta)
            run.cache_status(ingest="hit", split="hit", vectorize="hit")
            run.split_sizes(meta["sizes"])
            encoded = Encoded(vocabulary=meta["vocabulary"], **{k: arrays[k] for k in Encoded.ARRAYS})
            return encoded, meta["sizes"]

    with clock("ingest"):
        hit = store.load("ingest", ingest_key)
        if hit is not None:
            log.info("ingest: reusing cached product %s", store.entry("ingest", ingest_key))
            reviews = ingest.Reviews(frame=hit[0]["reviews"], digest=hit[1]["digest"], source=hit[1]["source"])
            ingest_meta = hit[1]
        else:
            reviews = ingest.ingest(cfg.ingest, cfg.seed)
            ingest_meta = {"digest": reviews.digest, "source": reviews.source, "counts": reviews.counts()}
            store.save("ingest", ingest_key, {"reviews": reviews.frame}, ingest_meta)
    run.dataset(ingest_meta)
    run.cache_status(ingest="hit" if hit is not None else "miss")
    if "split" not in cfg.stages:
        return None, None

    with clock("split"):
        parts = split.split(reviews, cfg.split, cfg.seed)
    run.split_sizes(parts.sizes())
    if not wants_vectors:
        return None, parts.sizes()

    with clock("build"):
        encoded = build.vectorize(parts, cfg.build)
        store.save("vectorize", vector_key, {k: getattr(encoded, k) for k in Encoded.ARRAYS},
                   {"vocabulary": encoded.vocabulary, "sizes": parts.sizes()})
    run.cache_status(split="miss", vectorize="miss")
    return encoded, parts.sizes()


def run(cfg: PipelineConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the pipeline once, tracked. Returns (metrics, objects)."""
    from pipeline import evaluate, fit  # imported here: they pull in TensorFlow

    if cfg.sweep.threads:
        limit_threads(cfg.sweep.threads)
    store = cache.StageCache(Path(cfg.cache_dir))
    clock = StageClock()
    objects: dict[str, Any] = {}
    with tracking.TrackedRun(cfg) as run:
        try:
            encoded, _ = prepare(cfg, store, clock, run)
            if encoded is None:
                run.complete()
                return {}, objects
            with clock("build"):
                model = build.build_model(cfg.build, len(encoded.vocabulary), encoded.x_train.shape[1], cfg.seed)
            run.model_summary(build.summary(model))
            objects.update(encoded=encoded, model=model)
            if "fit" not in cfg.stages:
                run.complete()
                return {}, objects

            with clock("fit"):
                fitted = fit.fit(model, encoded, cfg.fit, cfg.seed, callbacks=[run.epoch_logger()])
            run.fitted(fitted)
            objects["fitted"] = fitted
            metrics = {"val_loss": float(fitted.history["val_loss"].min()),
                       "val_accuracy": float(fitted.history["val_accuracy"].max())}
            if "evaluate" not in cfg.stages:
                run.complete()
                return metrics, objects

            with clock("evaluate"):
                result = evaluate.evaluate(model, encoded, fitted.history, cfg.evaluate)
                run.evaluation(result, encoded.y_test)
            if cfg.evaluate.log_model:
                with clock("log_model"):
                    run.log_model(model, encoded.vocabulary, cfg)
            objects["evaluation"] = result
            metrics.update(result.metrics)
            run.complete()
            return metrics, objects
        finally:
            run.stage_seconds(clock.seconds)
