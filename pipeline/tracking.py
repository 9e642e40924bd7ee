"""The one module that speaks to MLflow: what a run records, and how it ends.

A TrackedRun records, for one pipeline run: every setting as a flat dotted param, the data set as a
dataset input (source, content digest, row counts), tags (git commit and dirty state, package versions,
per-stage seconds, cache hits), per-epoch loss/accuracy/val_loss/val_accuracy at step = epoch (logged
as each epoch ends), the test metrics, artifacts (composed config, model summary, history CSV, figures,
MLflow's classifier evaluation plots) and the raw-text model. A run that raises ends FAILED; one
interrupted by Ctrl-C or SIGTERM ends KILLED. It lives in the training process, or in a recorder
process that the training process sends its calls to (pipeline.recorder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from pipeline import config
from pipeline.config import check_reachable, tracking_uri
from pipeline.recorder import Signals, outcome

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact read clutters logs
# Per-epoch curves are queued and written by MLflow's logging thread. With a buffer interval that thread
# waits on an event rather than polling its queue with a 1 s timeout, so a flush returns at once.
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")
PACKAGES = ("tensorflow", "keras", "mlflow", "hydra-core", "numpy", "pandas")
# Made-up reviews, so that no part of the data set is copied into the model's metadata.
INPUT_EXAMPLE = ["A moving story with wonderful acting; I would watch it again.",
                 "Dull, far too long, and the plot makes no sense at all.<br /><br />Skip it."]


def use(uri: str | None) -> str:
    """Point the MLflow client at `uri` (or the default, as tracking_uri decides) and return it."""
    return point_at(tracking_uri(config.TrackingConfig(uri=uri)))


def point_at(uri: str) -> str:
    """Point the MLflow client at `uri`, a store that is ready to write to: a new SQLite store is created
    (its schema migrated) by one process at a time.

    MLflow's tracking store migrates a new database on first use without a lock, so two runs started
    at once into a fresh mlflow.db (two terminals, a shell loop with &) both migrate it, and one fails
    half-way ("Online migration expected to match one row", "duplicate column name").
    """
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        with _exclusive(_sqlite_file(uri)):
            mlflow.MlflowClient(uri)  # creates the store, or finds it current; MLflow keeps it for later calls
    return uri


def _sqlite_file(uri: str) -> str:
    """The database file a sqlite:/// URI names, made absolute (the same file, from whichever folder)."""
    path = uri.split("?", 1)[0].removeprefix("sqlite:///")
    return uri if path in (uri, "", ":memory:") else os.path.abspath(path)


@contextmanager
def _exclusive(name: str):
    """Held by one process at a time, for `name` (a lock file in the temp folder, not beside the store).
    Where no lock can be had (Windows has no fcntl; a lock file another user owns), it goes without:
    the store is then created as MLflow alone would."""
    try:
        import fcntl

        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        handle = open(Path(tempfile.gettempdir()) / f"pipeline-mlflow-store-{digest}.lock", "a")
    except (ImportError, OSError) as error:
        log.debug("creating the store without a lock: %s", error)
        handle = None
    if handle is None:
        yield
        return
    with handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _requirements() -> list[str]:
    """What the logged model needs to load, pinned to the versions that trained it."""
    installed = {}
    for package in ("mlflow", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pandas"):
        try:
            installed[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if "tensorflow-cpu" in installed:  # one TensorFlow build is enough
        installed.pop("tensorflow", None)
    return [f"{package}=={version}" for package, version in installed.items()]


def _registering_dataset(call, attempts: int = 3):
    """`call()`, which registers a data set with the store first thing. Jobs of a parallel sweep register
    the same data set (same name and digest) at the same moment; a tracking server's SQL store checks
    for the row, then inserts it, and refuses the second insert as a duplicate. Nothing else was logged
    by then, and on the next try the row exists and is linked instead."""
    for attempt in range(attempts):
        try:
            return call()
        except mlflow.exceptions.MlflowException as error:
            if "unique constraint" not in str(error).lower() or attempt == attempts - 1:
                raise
            log.info("another job registered the same data set at the same moment; linking it instead")
            time.sleep(0.2 * (attempt + 1))


class ReviewsDataset(MetaDataset):
    """The reviews as MLflow sees them: where they came from, their digest and how many there are."""

    def __init__(self, source: str, digest: str, counts: dict[str, int]):
        try:
            with warnings.catch_warnings():  # a local path matches two equivalent MLflow source types
                warnings.simplefilter("ignore", UserWarning)
                resolved = resolve_dataset_source(str(Path(source).resolve()) if Path(source).exists() else source)
        except Exception:  # not a path or URI MLflow knows (keras.datasets.imdb): record it as a code source
            from mlflow.data.code_dataset_source import CodeDatasetSource

            resolved = CodeDatasetSource(tags={"source": source})
        self._counts = counts
        super().__init__(source=resolved, name="imdb-reviews", digest=digest[:20])

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": sum(self._counts.values()), **{f"{k}_rows": v for k, v in self._counts.items()}}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


HEADLINE = ("test_accuracy", "test_loss", "best_val_loss", "best_val_loss_epoch", "epochs_trained")


class TrackedRun:
    """Context manager around one MLflow run (or, under `mlflow run`, the run it created)."""

    def __init__(self, cfg: config.PipelineConfig, signals: bool = True):
        """`signals`: turn Ctrl-C and SIGTERM into a KILLED end (False where another process decides how
        the run ends, as for the recorder process)."""
        self.cfg = cfg
        self.run = None
        self.signals = Signals(enabled=signals)
        self.headline: dict[str, float] = {}  # what the closing log line reports

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "TrackedRun":
        from pipeline import sweep

        uri = check_reachable(tracking_uri(self.cfg.tracking))
        self.signals.install()
        try:
            with self.signals.write():  # a Ctrl-C now waits until the run exists and can end KILLED
                point_at(uri)
                if sweep.in_sweep():  # a job of a sweep: a child of the sweep's parent run
                    self.run = mlflow.start_run(experiment_id=os.environ[sweep.EXPERIMENT],
                                                run_name=self.cfg.tracking.run_name,
                                                parent_run_id=os.environ[sweep.PARENT_RUN])
                else:
                    if not os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`, the run and experiment are given
                        mlflow.set_experiment(self.cfg.tracking.experiment_name)
                    self.run = mlflow.start_run(run_name=self.cfg.tracking.run_name)
                self._record_setup()
        except BaseException as error:
            if self.run is not None:  # otherwise MLflow's exit hook would record it FINISHED
                self.__exit__(type(error), error, None)
            else:
                self.signals.restore()
            raise
        log.info("MLflow run %s (%s) in experiment %s at %s", self.run.info.run_id, self.run.info.run_name,
                 self.run.info.experiment_id, mlflow.get_tracking_uri())
        return self

    def complete(self) -> None:
        """Mark the run as having done every stage it was asked for (what a resumed sweep looks for)."""
        mlflow.set_tag("pipeline.complete", "true")

    def __exit__(self, kind, error, traceback) -> bool:
        self.end(*outcome(kind, error))
        return False  # a failing or interrupted run: its own exception propagates

    def end(self, status: str, failure: str | None = None) -> None:
        """Record the run's end: FINISHED, KILLED, or FAILED with `failure` as its error tag."""
        with self.signals.ending(status):
            if failure:
                mlflow.set_tag("error", failure[:5000])
            mlflow.end_run(status=status)
            log.info("MLflow run %s ended %s%s", self.run.info.run_id, status, "".join(
                f", {name} {self.headline[name]:.4g}" for name in HEADLINE if name in self.headline))

    def _record_setup(self) -> None:
        mlflow.log_params(config.flatten(self.cfg))
        tags = {"pipeline.stages": ",".join(self.cfg.stages), **_git_tags()}
        for package in PACKAGES:
            for distribution in (package, f"{package}-cpu"):  # TensorFlow ships as tensorflow or tensorflow-cpu
                try:
                    tags[f"version.{package}"] = metadata.version(distribution)
                    break
                except metadata.PackageNotFoundError:
                    continue
        mlflow.set_tags(tags)
        mlflow.log_text(config.recorded_yaml(self.cfg), "config/config.yaml")

    # -- what the stages produced ------------------------------------------------------------------
    def dataset(self, meta: dict) -> None:
        dataset = ReviewsDataset(meta["source"], meta["digest"], meta["counts"])
        _registering_dataset(lambda: mlflow.log_input(dataset, context="training"))
        mlflow.set_tag("data.digest", meta["digest"])

    def cache_status(self, **stages: str) -> None:
        mlflow.set_tags({f"cache.{stage}": status for stage, status in stages.items()})

    def split_sizes(self, sizes: dict[str, int]) -> None:
        mlflow.log_params({f"data.{name}_rows": count for name, count in sizes.items()})

    def stage_seconds(self, seconds: dict[str, float]) -> None:
        if mlflow.active_run() is not None:
            mlflow.set_tags({f"seconds.{stage}": f"{value:.2f}" for stage, value in seconds.items()})

    def model_summary(self, text: str) -> None:
        mlflow.log_text(text, "model_summary.txt")

    def log_epoch(self, epoch: int, logs: dict, seconds: float) -> None:
        """The four curves and the epoch's seconds, at step = epoch number (`epoch` counts from 0). Called
        from the thread that trains: the run is named, as MLflow's active run belongs to the main thread."""
        values = {k: float(v) for k, v in logs.items() if k in CURVES}
        values["epoch_seconds"] = seconds
        with self.signals.write():  # queued and written by MLflow's logging thread: training does not wait
            mlflow.log_metrics(values, step=epoch + 1, synchronous=False, run_id=self.run.info.run_id)

    def fitted(self, fitted) -> None:
        with self.signals.write():
            mlflow.flush_async_logging()  # every epoch's curves are in the store before the fit counts as done
        mlflow.log_text(fitted.history.to_csv(index=False), "history.csv")
        summary = {"epochs_trained": len(fitted.history),
                   "best_val_loss_epoch": int(fitted.history.loc[fitted.history["val_loss"].idxmin(), "epoch"]),
                   "best_val_loss": float(fitted.history["val_loss"].min())}
        if fitted.stopped_epoch is not None:
            summary["stopped_epoch"] = fitted.stopped_epoch
        if fitted.best_epoch is not None:
            summary["best_epoch"] = fitted.best_epoch
        mlflow.log_metrics(summary)
        self.headline.update(summary)

    def evaluation(self, probabilities, y_test, history) -> dict[str, float]:
        """Score the model's test probabilities (evaluate.score), record the metrics and figures, and
        return the metrics."""
        import pandas as pd
        from matplotlib import pyplot as plt

        from pipeline import evaluate

        result = evaluate.score(probabilities, y_test, history, self.cfg.evaluate)
        mlflow.log_metrics(result.metrics)
        self.headline.update(result.metrics)
        for name, figure in result.figures.items():
            mlflow.log_figure(figure, f"figures/{name}")
            plt.close(figure)
        frame = pd.DataFrame({"label": y_test.astype(int),
                              "prediction": (probabilities > self.cfg.evaluate.threshold).astype(int)})
        # MLflow's classifier evaluation adds the confusion matrix and its label metrics (test_f1_score, ...);
        # given static predictions it has no probabilities, so ROC and PR curves come from evaluate.py.
        with warnings.catch_warnings():  # hints about integer columns and empty classes in its own checks
            warnings.simplefilter("ignore")
            # Its first step registers `frame` as the run's evaluation data set, before it logs anything else.
            _registering_dataset(lambda: mlflow.models.evaluate(
                data=frame, targets="label", predictions="prediction", model_type="classifier",
                evaluator_config={"log_model_explainability": False, "metric_prefix": "test_"}))
        return result.metrics

    @staticmethod
    def preload() -> None:
        """Import what evaluation and model logging use, ahead of use (while the fit trains)."""
        from pipeline import evaluate

        evaluate.preload()
        import mlflow.models.evaluation.default_evaluator  # noqa: F401
        import mlflow.pyfunc  # noqa: F401

    def log_model(self, classifier: Path, vocabulary: list[str], cfg: config.PipelineConfig) -> None:
        """Log the raw-text pyfunc: pipeline/textmodel.py as model code, the saved Keras file `classifier`
        and the vocabulary."""
        import numpy as np
        from mlflow.models import Model, infer_signature

        from pipeline import textmodel

        with tempfile.TemporaryDirectory() as folder:
            vocabulary_file = Path(folder) / textmodel.VOCABULARY_FILE
            textmodel.save_vocabulary(vocabulary_file, vocabulary, cfg.build.sequence_length, cfg.build.truncate)
            # What mlflow.pyfunc.log_model does, less its check that the input example serves: the check
            # loads the model, and with it TensorFlow, into this process (3 s where the run is recorded
            # apart from the fit; see pipeline.recorder). The project's serving tests make that check.
            info = Model.log(
                artifact_path=None,  # the model's name is `name`, as in MLflow 3
                name="model",
                flavor=_UncheckedPyfunc,
                flavor_name="pyfunc.ModelFromCode",
                validate_serving_input=False,
                python_model=str(Path(textmodel.__file__)),  # models from code: no pickled classes
                artifacts={"classifier": str(classifier), "vocabulary": str(vocabulary_file)},
                signature=infer_signature(INPUT_EXAMPLE, np.full(len(INPUT_EXAMPLE), 0.5)),  # [string] -> [double]
                input_example=INPUT_EXAMPLE,
                pip_requirements=_requirements(),  # stated, not inferred: inference reloads the model
                registered_model_name=cfg.evaluate.registered_model_name,
            )
        mlflow.set_tag("model_uri", info.model_uri)


class _UncheckedPyfunc:
    """mlflow.pyfunc as the flavor that mlflow.models.Model.log saves with (a flavor is any object with
    a save_model), taking Model.log's switch `validate_serving_input`, which mlflow.pyfunc.save_model
    does not accept."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


# -- sweeps: the parent run and its analysis ---------------------------------------------------------
def _git_tags() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no")))}


def open_sweep_parent(cfg: config.PipelineConfig, axes: dict[str, str], sweep_dir: str) -> tuple[str, str]:
    """Create the sweep's parent run, or adopt the one `mlflow run` created. Returns (run id, experiment id)."""
    from mlflow.entities import Param

    point_at(check_reachable(tracking_uri(cfg.tracking)))
    client = mlflow.MlflowClient()
    # Under `mlflow run` the project's run becomes the parent; the variable must not reach the jobs,
    # or the first job would record into the parent itself.
    adopted = os.environ.pop("MLFLOW_RUN_ID", None)
    if cfg.sweep.resume:  # an interrupted sweep continues under its own parent
        run = client.get_run(cfg.sweep.resume)
        if run.data.tags.get("sweep.parent") != "true":
            raise ValueError(f"sweep.resume={cfg.sweep.resume}: that run is not a sweep's parent run")
        client.update_run(run.info.run_id, status="RUNNING")
        if adopted and adopted != cfg.sweep.resume:  # `mlflow run` made a run of its own: point it to the parent
            client.set_tag(adopted, "sweep.resumed_parent", cfg.sweep.resume)
    elif adopted:
        run = client.get_run(adopted)
    else:
        experiment = mlflow.set_experiment(cfg.tracking.experiment_name)
        name = cfg.tracking.run_name or "sweep " + ",".join(key.rsplit(".", 1)[-1] for key in axes)
        run = client.create_run(experiment.experiment_id, run_name=name)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(f"sweep.{key}", value[:6000]) for key, value in axes.items()],
                     tags=[mlflow.entities.RunTag(k, v) for k, v in
                           {"sweep.parent": "true", "sweep.dir": sweep_dir, **_git_tags()}.items()])
    return run_id, run.info.experiment_id


def record_failed_job(run_name: str, error: Exception) -> None:
    """A sweep job that could not start (invalid settings): a FAILED child run that says why."""
    from pipeline import sweep

    client = mlflow.MlflowClient()
    run = client.create_run(os.environ[sweep.EXPERIMENT], run_name=run_name,
                            tags={"mlflow.parentRunId": os.environ[sweep.PARENT_RUN],
                                  "error": f"{type(error).__name__}: {error}"[:5000]})
    client.set_terminated(run.info.run_id, "FAILED")


def finished_child(parent_run_id: str, run_name: str) -> dict | None:
    """The latest complete, FINISHED child of `parent_run_id` named `run_name` (id, best validation accuracy)."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    quoted = run_name.replace("'", "\\'")
    found = client.search_runs([parent.info.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                             f"attributes.run_name = '{quoted}' and attributes.status = 'FINISHED' "
                                             "and tags.`pipeline.complete` = 'true'")
    if not found:
        return None
    history = client.get_metric_history(found[0].info.run_id, "val_accuracy")
    best = max((point.value for point in history), default=float("nan"))
    return {"run_id": found[0].info.run_id, "val_accuracy": best}


def close_sweep_parent(run_id: str, status: str) -> None:
    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def _history(client, run_id: str):
    import pandas as pd

    columns = {}
    for curve in CURVES:
        columns[curve] = {point.step: point.value for point in client.get_metric_history(run_id, curve)}
    frame = pd.DataFrame(columns).sort_index()
    frame.insert(0, "epoch", frame.index.astype(int))
    return frame.reset_index(drop=True)


def analyze_sweep(parent_run_id: str, alias: str | None = None):
    """Read the parent's children back, analyse them, and write table, figures and report to the parent.
    With `alias`, the best job's registered model version (if it registered one) gets that alias."""
    from matplotlib import pyplot as plt

    from pipeline import analysis

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], max_results=5000,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    latest: dict[str, object] = {}  # a resumed sweep can hold several attempts of one job: keep one
    for run in children:  # oldest first, so later attempts win, and a finished one beats any other
        kept = latest.get(run.info.run_name)
        if kept is None or run.info.status == "FINISHED" or kept.info.status != "FINISHED":
            latest[run.info.run_name] = run
    rows, histories, failed, early = [], {}, [], None
    for run in latest.values():
        name, run_id = run.info.run_name, run.info.run_id
        params, metrics = run.data.params, run.data.metrics
        if run.info.status != "FINISHED" or "test_accuracy" not in metrics:
            failed.append({"job": name, "run_id": run_id,
                           "error": run.data.tags.get("error", f"run {run.info.status.lower()}")})
            continue
        history = _history(client, run_id)
        if params.get("fit.early_stopping.enabled") == "True":
            early = {"job": name, "run_id": run_id, "test_accuracy": metrics["test_accuracy"],
                     "stopped_epoch": int(metrics.get("stopped_epoch", metrics["epochs_trained"])),
                     "best_epoch": int(metrics.get("best_epoch", metrics["best_val_loss_epoch"]))}
            continue
        histories[run_id] = history
        rows.append(analysis.job_row(name, run_id, int(params["build.hidden_units"]), int(params["fit.epochs"]),
                                     history, metrics["test_accuracy"]))
    result = analysis.analyze(rows, histories, failed, early)
    client.log_text(parent_run_id, result.table.to_csv(index=False), "analysis/jobs.csv")
    if not result.failed.empty:
        client.log_text(parent_run_id, result.failed.to_csv(index=False), "analysis/failed_jobs.csv")
    client.log_text(parent_run_id, result.report, "analysis/report.md")
    for name, figure in result.figures.items():
        client.log_figure(parent_run_id, figure, f"analysis/{name}")
        plt.close(figure)
    if result.headline:
        client.log_batch(parent_run_id, metrics=[
            mlflow.entities.Metric(key, value, int(time.time() * 1000), 0)
            for key, value in result.headline.items() if value == value])  # NaN: nothing to compare
    if early:
        client.set_tag(parent_run_id, "sweep.early_stopping_run", early["run_id"])
    if not result.table.empty:
        best = result.table.loc[result.table["best_val_accuracy"].idxmax()]
        client.set_tag(parent_run_id, "sweep.best_run", best["run_id"])
        client.set_tag(parent_run_id, "sweep.best_job", best["job"])
        if alias:
            promote(client, parent_run_id, best["run_id"], alias)
    return result


def promote(client, parent_run_id: str, run_id: str, alias: str) -> None:
    """Point `alias` of the registered model at the version that run `run_id` registered, if it did."""
    model_id = client.get_run(run_id).data.tags.get("model_uri", "").removeprefix("models:/")
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if not model_id or getattr(v, "model_id", None) in (None, model_id)]
    if not versions:
        return
    version = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(version.name, alias, version.version)
    client.set_tag(parent_run_id, "sweep.champion", f"models:/{version.name}@{alias} -> version {version.version}")
    log.info("models:/%s@%s now serves version %s (run %s)", version.name, alias, version.version, run_id)
