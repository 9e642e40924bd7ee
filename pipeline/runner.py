"""Wiring: run the configured prefix of ingest -> split -> build -> fit -> evaluate inside one tracked run.

`run(cfg)` returns (metrics, objects): the final metrics (what a sweeper optimizes) and the products.
Stages stay free of I/O policy and tracking; this module decides what is cached and hands every
product to `pipeline.tracking`, the one module that speaks to MLflow. The order is chosen for time: the
data is prepared (in a forked process, when not cached) while TensorFlow imports, and so is the run,
opened by a recorder process (pipeline.recorder) where the process can fork, else in this one while the
fit trains; the fit starts as soon as the model is built. What happens before the run is open is
recorded on it once it is, failures included.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import build, cache, ingest, recorder, split, stream, textmodel
from pipeline.config import PipelineConfig, check_reachable, tracking_uri
from pipeline.build import Encoded

if TYPE_CHECKING:
    from pipeline import tracking

log = logging.getLogger(__name__)

# Where a copy lives is not what it holds; nor is how it is read: both modes give the same rows and digest
# and byte-identical vectorize products, so the mode stays out of the keys. The two ingest products differ
# in form (a table; a blob of texts and arrays), so each mode keeps its own under its own stage name.
INGEST_KEY_SKIPS = ("path", "url", "sha256", "download", "mode")
INGEST_STAGES = {"memory": "ingest", "stream": "ingest_stream"}


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


# Packages Keras imports when it starts that the pipeline needs only to evaluate, if at all: its
# scikit-learn wrappers (and with them scikit-learn) and its image drawing (and with it pyplot), about
# 1 s of a start that has no other use for them.
DEFERRED_IMPORTS = ("keras.wrappers", "keras.visualization", "keras.src.visualization")


def defer_imports(names: tuple[str, ...] = DEFERRED_IMPORTS) -> None:
    """Make each package in `names` a module that runs its own code on first use (the first attribute
    asked of it that it lacks) rather than when it is imported. Keras's imports of them then cost
    nothing, and the run imports scikit-learn and pyplot while the fit runs (evaluate.preload), when the
    interpreter is otherwise idle. Nothing changes for code that uses them. Only before Keras is imported."""
    import importlib.machinery
    import importlib.util

    for name in names:
        if name.split(".")[0] in sys.modules:
            continue
        spec = importlib.util.find_spec(name.split(".")[0])
        for depth in range(1, name.count(".") + 1):
            if spec is None or not spec.submodule_search_locations:
                break
            spec = importlib.machinery.PathFinder.find_spec(".".join(name.split(".")[:depth + 1]),
                                                            list(spec.submodule_search_locations))
        if spec is None or spec.loader is None or spec.name != name:
            continue
        module = importlib.util.module_from_spec(spec)

        def load(attribute: str, module=module, spec=spec):
            del module.__getattr__
            spec.loader.exec_module(module)
            return getattr(module, attribute)

        module.__getattr__ = load
        sys.modules[name] = module


XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def use_compile_cache(cache_dir: str) -> Path | None:
    """Point XLA's persistent compilation cache at `cache_dir`/xla/<host>, so that a run whose compiled
    programs were built before (same model shapes, same TensorFlow, same kind of CPU) loads them instead
    of compiling (about 0.5 s of the first epoch). TensorFlow reads TF_XLA_FLAGS once, when it starts: a
    later job in the same process keeps the first setting, and a directory set by the user wins.

    The files are machine code for this CPU, so the folder is named for the TensorFlow version and the
    CPU's features: a cache directory shared by different machines (a cluster's shared disk) keeps one
    folder per kind. Entries are written to a temporary file and renamed, so parallel jobs may share it."""
    import hashlib
    import os
    import platform
    from importlib import metadata

    flags = os.environ.get("TF_XLA_FLAGS", "")
    if XLA_CACHE_FLAG in flags or "tensorflow" in sys.modules:
        return None
    versions = []
    for package in ("tensorflow-cpu", "tensorflow"):
        try:
            versions.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        cpu = platform.processor()
    host = hashlib.sha256("\n".join([platform.machine(), cpu, *versions]).encode()).hexdigest()[:16]
    folder = (Path(cache_dir) / "xla" / host).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.debug("no XLA compilation cache (%s)", error)
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} {XLA_CACHE_FLAG}={folder}".strip()
    return folder


def _ingest_key(cfg: PipelineConfig) -> str:
    settings = {k: v for k, v in asdict(cfg.ingest).items() if k not in INGEST_KEY_SKIPS}
    settings["input"] = ingest.input_digest(cfg.ingest)
    settings["seed"] = cfg.seed if cfg.ingest.source == "table" else None
    return cache.make_key("ingest", settings, [ingest, stream])


def _vectorize_key(cfg: PipelineConfig, ingest_key: str) -> str:
    settings = {"ingest": ingest_key, "split": asdict(cfg.split), "seed": cfg.seed,
                "build": {name: getattr(cfg.build, name) for name in build.VECTORIZE_FIELDS}}
    return cache.make_key("vectorize", settings, [ingest, split, build, textmodel, stream])


def _ingest_meta(store: cache.StageCache, ingest_key: str) -> dict | None:
    """The cached ingest product's meta, from either mode's entry (they describe the same rows)."""
    for stage in INGEST_STAGES.values():
        meta = store.meta(stage, ingest_key)
        if meta is not None:
            return meta
    return None


def _fill(cfg: PipelineConfig, store: cache.StageCache, ingest_key: str, vector_key: str | None,
          clock: StageClock, deferred: list | None = None, resolved: tuple[str, str] | None = None) -> dict:
    """Ingest, split and vectorize into the stage cache, reusing a cached ingest product. Returns what
    the tracked run records about it: ingest meta, split sizes and which stages were cache hits.
    `deferred`: where to leave the writing of a new ingest product (which this run no longer needs) for
    later; without it the product is written at once. `resolved`: the ingest mode and why, when the
    caller has decided it (stream.resolve_mode)."""
    mode, reason = resolved or stream.resolve_mode(cfg.ingest)
    log.info("ingest: %s mode (%s)", mode, reason)
    if mode == "stream":
        return {**_fill_streamed(cfg, store, ingest_key, vector_key, clock), "mode": mode}
    with clock("ingest"):
        hit = store.load("ingest", ingest_key)
        if hit is not None:
            log.info("ingest: reusing cached product %s", store.entry("ingest", ingest_key))
            reviews = ingest.Reviews(frame=hit[0]["reviews"], digest=hit[1]["digest"], source=hit[1]["source"])
            ingest_meta = hit[1]
        else:
            reviews = ingest.ingest(cfg.ingest, cfg.seed)
            ingest_meta = {"digest": reviews.digest, "source": reviews.source, "counts": reviews.counts()}
    if hit is None:  # written now, or by the background process once the run has what it needs
        def save_ingest(frame=reviews.frame, meta=ingest_meta) -> None:
            with clock("cache_write"):
                store.save("ingest", ingest_key, {"reviews": frame}, meta)

        if deferred is None:
            save_ingest()
        else:
            deferred.append(save_ingest)
    report = {"ingest_meta": ingest_meta, "ingest_hit": hit is not None, "sizes": None, "encoded": None,
              "mode": mode}
    if "split" not in cfg.stages:
        return report
    with clock("split"):
        parts = split.split(reviews, cfg.split, cfg.seed)
    report["sizes"] = parts.sizes()
    if vector_key is None:
        return report
    with clock("vectorize"):
        encoded = build.vectorize(parts, cfg.build)
    with clock("cache_write"):
        store.save("vectorize", vector_key, {k: getattr(encoded, k) for k in Encoded.ARRAYS},
                   {"vocabulary": encoded.vocabulary, "sizes": parts.sizes()})
    report["encoded"] = encoded
    return report


def _fill_streamed(cfg: PipelineConfig, store: cache.StageCache, ingest_key: str, vector_key: str | None,
                   clock: StageClock) -> dict:
    """_fill with the texts on disk: the blob is written straight into the ingest entry's staging
    folder and the token ids into the vectorize entry's, so neither product is held to be saved."""
    stage = INGEST_STAGES["stream"]
    with clock("ingest"):
        hit = store.load(stage, ingest_key)
        if hit is not None:
            log.info("ingest: reusing cached product %s", store.entry(stage, ingest_key))
            reviews = stream.StreamedReviews.from_product(*hit)
        else:
            staging = store.begin(stage, ingest_key)
            try:
                reviews = stream.ingest_stream(cfg.ingest, staging)
            except BaseException:
                store.discard(staging)
                raise
    if hit is None:
        with clock("cache_write"):
            entry = store.commit(stage, ingest_key, staging, reviews.product(), reviews.meta(),
                                 hashes={"texts": reviews.blob_sha256})
        reviews.blob = entry / stream.BLOB  # the same bytes, whichever process's entry won
    report = {"ingest_meta": reviews.meta(), "ingest_hit": hit is not None, "sizes": None, "encoded": None}
    if "split" not in cfg.stages:
        return report
    with clock("split"):
        rows = stream.split_rows(reviews, cfg.split, cfg.seed)
    report["sizes"] = rows.sizes()
    if vector_key is None:
        return report
    staging = store.begin("vectorize", vector_key)
    try:
        with clock("vectorize"):
            encoded = stream.vectorize_stream(reviews, rows, cfg.build, staging)
    except BaseException:
        store.discard(staging)
        raise
    with clock("cache_write"):
        product = {k: staging / f"{k}.npy" if k.startswith("x_") else getattr(encoded, k) for k in Encoded.ARRAYS}
        store.commit("vectorize", vector_key, staging, product,
                     {"vocabulary": encoded.vocabulary, "sizes": rows.sizes()})
    report["encoded"] = encoded  # its token ids mapped from the cache files: the fit reads them from there
    return report


def _fill_in_child(cfg, store, ingest_key, vector_key, pipe) -> None:
    clock = StageClock()
    deferred: list = []
    try:
        report = _fill(cfg, store, ingest_key, vector_key, clock, deferred)
        report["encoded"] = None  # the parent reads the arrays from the cache, not through the pipe
        pipe.send(("done", report, clock.seconds))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        pipe.send(("failed", error, clock.seconds))
        return
    finally:
        pipe.close()
    for save in deferred:  # the ingest product, for later runs, while this run trains
        try:
            save()
        except Exception as error:  # noqa: BLE001 - a later run reads the archive again
            log.warning("could not write the ingest product to the stage cache: %s", error)


class Ahead:
    """Data preparation started in a forked process before TensorFlow and MLflow are imported, so that
    reading and tokenizing the reviews (one core) overlaps with those imports (the other core). The
    products travel through the stage cache."""

    def __init__(self, cfg: PipelineConfig, store: cache.StageCache, ingest_key: str, vector_key: str):
        context = multiprocessing.get_context("fork")
        self._pipe, child_end = context.Pipe(duplex=False)
        self._process = context.Process(target=_fill_in_child, name="pipeline-prepare", daemon=True,
                                        args=(cfg, store, ingest_key, vector_key, child_end))
        self._process.start()
        child_end.close()

    def result(self, clock: StageClock) -> dict:
        try:
            status, payload, seconds = self._pipe.recv()
        except EOFError:
            self._process.join(timeout=30)
            raise RuntimeError(f"data preparation died (exit code {self._process.exitcode})") from None
        for stage, value in seconds.items():
            clock.seconds[stage] = clock.seconds.get(stage, 0.0) + value
        if status == "failed":
            raise payload
        return payload

    def finish(self) -> None:
        """Wait while the process writes the ingest product to the cache (it keeps running after the
        hand-off), then stop it if it has not ended."""
        self._process.join(timeout=120)
        self.cancel()

    def cancel(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)


def _keys(cfg: PipelineConfig) -> tuple[str, str | None]:
    """The ingest and vectorize cache keys (None for vectorize when the stages stop before build)."""
    if cfg.ingest.source != "keras":
        ingest.locate(cfg.ingest)  # download first if needed, so the key sees the real file
    ingest_key = _ingest_key(cfg)
    return ingest_key, _vectorize_key(cfg, ingest_key) if "build" in cfg.stages else None


def _can_prepare_ahead(cfg: PipelineConfig) -> bool:
    """Whether this process can fork safely to prepare the data (Linux, TensorFlow not yet loaded:
    forking a process that runs TensorFlow's threads is not safe; the keras source needs TensorFlow)."""
    return "build" in cfg.stages and cfg.ingest.source != "keras" and recorder.can_fork()


def start_ahead(cfg: PipelineConfig, store: cache.StageCache, keys: tuple[str, str]) -> Ahead | None:
    """Start preparing the data in the background when it is not cached yet."""
    ingest_key, vector_key = keys
    if _ingest_meta(store, ingest_key) is not None and store.meta("vectorize", vector_key) is not None:
        return None
    try:
        ahead = Ahead(cfg, store, ingest_key, vector_key)
    except (OSError, ValueError, AssertionError) as error:  # cannot fork here: the run prepares the data itself
        log.debug("no background preparation (%s)", error)
        return None
    log.info("ingest, split, vectorize: preparing in a background process while TensorFlow loads")
    return ahead


def prepare(cfg: PipelineConfig, store: cache.StageCache, clock: StageClock, run: tracking.TrackedRun,
            keys: tuple[str, str | None] | None = None, ahead: Ahead | None = None):
    """Ingest, split and vectorize as far as cfg.stages asks, reusing cached products where they match.
    `keys`: the cache keys when the caller has them already (they hash the input file)."""
    ingest_key, vector_key = keys if keys is not None else _keys(cfg)
    report = ahead.result(clock) if ahead is not None else None

    # made just now in the background (its ingest product may still be being written), or cached earlier
    ingest_meta = report["ingest_meta"] if report is not None else _ingest_meta(store, ingest_key)
    # streamed: the arrays stay on disk, mapped (the mode the background process chose, or this run's)
    resolved = stream.resolve_mode(cfg.ingest) if report is None else None
    streamed = (report["mode"] if report is not None else resolved[0]) == "stream"
    if vector_key and ingest_meta is not None:
        with clock("vectorize"):  # reading the cached arrays (made earlier, or just now in the background)
            hit = store.load("vectorize", vector_key, mmap=streamed)
        if hit is not None:
            arrays, meta = hit
            encoded = Encoded(vocabulary=meta["vocabulary"], **{k: arrays[k] for k in Encoded.ARRAYS})
            run.dataset(ingest_meta)
            if report is None:
                log.info("ingest, split, vectorize: reusing cached products (keys %s, %s) from %s",
                         ingest_key, vector_key, store.root)
                run.cache_status(ingest="hit", split="hit", vectorize="hit")
            else:  # made just now by the background process
                run.cache_status(ingest="hit" if report["ingest_hit"] else "miss", split="miss", vectorize="miss")
            run.split_sizes(meta["sizes"])
            return encoded, meta["sizes"]

    report = _fill(cfg, store, ingest_key, vector_key, clock, resolved=resolved)
    run.dataset(report["ingest_meta"])
    run.cache_status(ingest="hit" if report["ingest_hit"] else "miss")
    if report["sizes"] is not None:
        run.split_sizes(report["sizes"])
    if report["encoded"] is not None:
        run.cache_status(split="miss", vectorize="miss")
    return report["encoded"], report["sizes"]


def run(cfg: PipelineConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the pipeline once, tracked. Returns (metrics, objects)."""
    store = cache.StageCache(Path(cfg.cache_dir))
    if cfg.fit.jit_compile and cfg.fit.compile_cache:
        use_compile_cache(cfg.cache_dir)
    check_reachable(tracking_uri(cfg.tracking))  # an unreachable server fails the run before any data is read
    keys = _keys(cfg) if _can_prepare_ahead(cfg) else None  # otherwise computed inside the tracked run
    ahead = start_ahead(cfg, store, keys) if keys is not None else None
    kept = recorder.start(cfg)  # the run, kept by a process of its own where possible
    try:
        result = _run(cfg, store, keys, ahead, kept)
    except BaseException as error:
        if ahead is not None:
            ahead.cancel()
        if kept is not None:  # ended before the run was entered: end it as this error says
            kept.close(type(error), error)
        raise
    if ahead is not None:
        ahead.finish()
    return result


class _Later:
    """Stands in for the tracked run until it is open: keeps the calls made on it, in order, and makes
    them on the run once it exists."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def replay(self, run: tracking.TrackedRun) -> None:
        for name, args, kwargs in self.calls:
            getattr(run, name)(*args, **kwargs)


FIT_SWITCH_INTERVAL = 0.0002  # seconds; measured over alternating runs: 0.3-0.8 s sooner than the default 0.005


class Training:
    """The fit, in a thread of its own, started as soon as the model is built. Meanwhile the main thread
    imports MLflow and opens the run (about 1.5 s of Python): a compiled epoch runs outside the
    interpreter and leaves it free. Epochs that end before the run is open are logged when it opens,
    in order; later ones as they end. `stop()` ends the fit after the epoch under way."""

    def __init__(self, model, encoded: Encoded, cfg: PipelineConfig, clock: StageClock):
        from pipeline import fit

        self.sink = None  # the run's epoch logging, once the run is open
        self.waiting: list[tuple[int, dict, float]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.fitted = self.error = None

        def train() -> None:
            try:
                with clock("fit"):
                    self.fitted = fit.fit(model, encoded, cfg.fit, cfg.seed, callbacks=[self._relay()])
            except BaseException as error:  # noqa: BLE001 - raised again in the main thread, inside the run
                self.error = error

        self.thread = threading.Thread(target=train, name="fit", daemon=True)
        # While the main thread imports and opens the run, the fit thread needs the interpreter for a
        # moment between compiled calls; a shorter switch interval than Python's 5 ms lets it in sooner.
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(FIT_SWITCH_INTERVAL)
        self.thread.start()

    def _relay(self):
        import keras

        training = self

        class Relay(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                finished = (epoch, dict(logs or {}), time.perf_counter() - self.started)  # the first includes compiling
                with training.lock:
                    if training.sink is None:
                        training.waiting.append(finished)
                    else:
                        training.sink(*finished)
                if training.stopping.is_set():
                    self.model.stop_training = True

        return Relay()

    def attach(self, sink) -> None:
        """Log the epochs that ended so far with `sink(epoch, logs, seconds)`, and every later one."""
        with self.lock:
            for finished in self.waiting:
                sink(*finished)
            self.waiting, self.sink = [], sink

    def _join(self) -> None:
        self.thread.join()
        sys.setswitchinterval(self.switch_interval)

    def result(self):
        self._join()
        if self.error is not None:
            raise self.error
        return self.fitted

    def stop(self) -> None:
        self.stopping.set()
        self._join()


@dataclass
class _Started:
    """What happened before the run was open: the calls to record on it, the products, the fit under way
    (or the error that stopped the preparation, which the run records as its failure)."""
    later: _Later
    objects: dict[str, Any]
    training: Training | None = None
    failed: Exception | None = None

    def stop(self) -> None:
        if self.training is not None:
            self.training.stop()


def _start(cfg: PipelineConfig, store: cache.StageCache, keys, ahead: Ahead | None, clock: StageClock) -> _Started:
    """Prepare the data, build the model and start the fit, all before the run is open."""
    started = _Started(later=_Later(), objects={})
    try:
        encoded, _ = prepare(cfg, store, clock, started.later, keys, ahead)
        if encoded is None:
            return started
        with clock("build"):
            model = build.build_model(cfg.build, len(encoded.vocabulary), encoded.x_train.shape[1], cfg.seed)
        started.later.model_summary(build.summary(model))
        started.objects.update(encoded=encoded, model=model)
        if "fit" in cfg.stages:
            started.training = Training(model, encoded, cfg, clock)
    except Exception as error:  # noqa: BLE001 - the run opens next and ends FAILED with it
        started.failed = error
    return started


def _run(cfg: PipelineConfig, store: cache.StageCache, keys: tuple[str, str | None] | None, ahead: Ahead | None,
         kept: recorder.Recorder | None):
    defer_imports()
    import keras  # noqa: F401 - TensorFlow's import, while the data is prepared and the run opened elsewhere

    if cfg.sweep.threads:
        limit_threads(cfg.sweep.threads)
    clock = StageClock()
    started = _start(cfg, store, keys, ahead, clock)
    try:
        if kept is None:
            from pipeline import tracking  # MLflow's import and the run's opening overlap the first epochs

            kept = tracking.TrackedRun(cfg)
        with kept as run:
            try:
                return _finish(cfg, run, started, clock)
            finally:
                started.stop()  # a failed or interrupted run: its fit ends before the run's end is recorded
                run.stage_seconds(clock.seconds)
    except BaseException:
        started.stop()  # interrupted before the run was open
        raise


def _finish(cfg: PipelineConfig, run: tracking.TrackedRun | recorder.Recorder, started: _Started, clock: StageClock):
    """Inside the open run: record what happened before it, then see the fit through and evaluate."""
    from pipeline import evaluate

    if started.failed is not None:
        raise started.failed
    started.later.replay(run)
    objects, training = started.objects, started.training
    if training is None:
        run.complete()
        return {}, objects
    training.attach(run.log_epoch)
    if "evaluate" in cfg.stages:  # the evaluation's imports, while the compiled epochs run
        try:
            run.preload()
        except Exception:  # noqa: BLE001 - only a head start: evaluation imports (and reports) for itself
            log.debug("preloading failed", exc_info=True)
    fitted = training.result()
    run.fitted(fitted)
    objects["fitted"] = fitted
    metrics = {"val_loss": float(fitted.history["val_loss"].min()),
               "val_accuracy": float(fitted.history["val_accuracy"].max())}
    if "evaluate" not in cfg.stages:
        run.complete()
        return metrics, objects

    model, encoded = objects["model"], objects["encoded"]
    with tempfile.TemporaryDirectory() as folder:
        classifier = Path(folder) / textmodel.CLASSIFIER_FILE
        with clock("evaluate"):  # the model predicts here, where it is
            probabilities = evaluate.predict(model, encoded.x_test, cfg.evaluate.batch_size)
        if cfg.evaluate.log_model:
            with clock("log_model"):  # saved while a recorder process still records the fit
                model.save(classifier)
        with clock("evaluate"):  # the run scores and draws (evaluate.score) and records it
            scores = run.evaluation(probabilities, encoded.y_test, fitted.history)
        if cfg.evaluate.log_model:
            with clock("log_model"):
                run.log_model(classifier, encoded.vocabulary, cfg)
    objects["evaluation"] = evaluate.Evaluation(metrics=scores, probabilities=probabilities)
    metrics.update(scores)
    run.complete()
    return metrics, objects
