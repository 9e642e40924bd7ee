"""The one module that speaks to MLflow: what a run records, and how it ends.

A TrackedRun records, for one pipeline run: every setting as a flat dotted param, the data set as a
dataset input (source, content digest, row counts), tags (git commit and dirty state, package versions,
per-stage seconds, cache hits), per-epoch loss/accuracy/val_loss/val_accuracy at step = epoch (logged
as each epoch ends), the test metrics, artifacts (composed config, model summary, history CSV, figures,
MLflow's classifier evaluation plots) and the raw-text model. A run that raises ends FAILED; one
interrupted by Ctrl-C or SIGTERM ends KILLED.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from pipeline import config

log = logging.getLogger(__name__)

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")
PACKAGES = ("tensorflow", "keras", "mlflow", "hydra-core", "numpy", "pandas")
# Made-up reviews, so that no part of the data set is copied into the model's metadata.
INPUT_EXAMPLE = ["A moving story with wonderful acting; I would watch it again.",
                 "Dull, far too long, and the plot makes no sense at all.<br /><br />Skip it."]


def tracking_uri(cfg: config.TrackingConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the embedded store that `mlflow ui` opens here."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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


class ReviewsDataset(MetaDataset):
    """The reviews as MLflow sees them: where they came from, their digest and how many there are."""

    def __init__(self, source: str, digest: str, counts: dict[str, int]):
        try:
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


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, treated as Ctrl-C so the run ends KILLED."""


class TrackedRun:
    """Context manager around one MLflow run (or, under `mlflow run`, the run it created)."""

    def __init__(self, cfg: config.PipelineConfig, composed_yaml: str = ""):
        self.cfg = cfg
        self.composed_yaml = composed_yaml
        self.run = None
        self._previous_sigterm = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "TrackedRun":
        mlflow.set_tracking_uri(tracking_uri(self.cfg.tracking))
        if not os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`, the run and experiment are given
            mlflow.set_experiment(self.cfg.tracking.experiment_name)
        self.run = mlflow.start_run(run_name=self.cfg.tracking.run_name)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._record_setup()
        log.info("MLflow run %s (%s) in experiment %s at %s", self.run.info.run_id, self.run.info.run_name,
                 self.run.info.experiment_id, mlflow.get_tracking_uri())
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
        if kind is None:
            status = "FINISHED"
        elif issubclass(kind, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
            mlflow.set_tag("error", f"{kind.__name__}: {error}"[:5000])
        mlflow.end_run(status=status)
        return False

    @staticmethod
    def _on_sigterm(signum, frame):
        raise _Interrupted()

    def _record_setup(self) -> None:
        mlflow.log_params(config.flatten(self.cfg))
        tags = {"pipeline.stages": ",".join(self.cfg.stages)}
        commit = _git("rev-parse", "HEAD")
        if commit:
            tags["git.commit"] = commit
            tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
        for package in PACKAGES:
            try:
                tags[f"version.{package}"] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
        mlflow.set_tags(tags)
        if self.composed_yaml:
            mlflow.log_text(self.composed_yaml, "config/config.yaml")

    # -- what the stages produced ------------------------------------------------------------------
    def dataset(self, meta: dict) -> None:
        mlflow.log_input(ReviewsDataset(meta["source"], meta["digest"], meta["counts"]), context="training")
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

    def epoch_logger(self):
        """A Keras callback that logs the four curves at step = epoch number, as each epoch ends."""
        import keras

        class EpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                values = {k: float(v) for k, v in (logs or {}).items() if k in CURVES}
                mlflow.log_metrics(values, step=epoch + 1, synchronous=True)

        return EpochLogger()

    def fitted(self, fitted) -> None:
        mlflow.log_text(fitted.history.to_csv(index=False), "history.csv")
        summary = {"epochs_trained": len(fitted.history),
                   "best_val_loss_epoch": int(fitted.history.loc[fitted.history["val_loss"].idxmin(), "epoch"]),
                   "best_val_loss": float(fitted.history["val_loss"].min())}
        if fitted.stopped_epoch is not None:
            summary["stopped_epoch"] = fitted.stopped_epoch
        if fitted.best_epoch is not None:
            summary["best_epoch"] = fitted.best_epoch
        mlflow.log_metrics(summary)

    def evaluation(self, result, y_test) -> None:
        import pandas as pd
        from matplotlib import pyplot as plt

        mlflow.log_metrics(result.metrics)
        for name, figure in result.figures.items():
            mlflow.log_figure(figure, f"figures/{name}")
            plt.close(figure)
        frame = pd.DataFrame({"label": y_test.astype(int),
                              "prediction": (result.probabilities > self.cfg.evaluate.threshold).astype(int)})
        # MLflow's classifier evaluation adds the confusion matrix and its label metrics (test_f1_score, ...);
        # given static predictions it has no probabilities, so ROC and PR curves come from evaluate.py.
        mlflow.models.evaluate(data=frame, targets="label", predictions="prediction", model_type="classifier",
                               evaluator_config={"log_model_explainability": False, "metric_prefix": "test_"})

    def log_model(self, model, vocabulary: list[str], cfg: config.PipelineConfig) -> None:
        """Log the raw-text pyfunc: pipeline/textmodel.py as model code, the Keras file and vocabulary."""
        import numpy as np
        from mlflow.models import infer_signature

        from pipeline import textmodel

        with tempfile.TemporaryDirectory() as folder:
            classifier = Path(folder) / textmodel.CLASSIFIER_FILE
            vocabulary_file = Path(folder) / textmodel.VOCABULARY_FILE
            model.save(classifier)
            textmodel.save_vocabulary(vocabulary_file, vocabulary, cfg.build.sequence_length, cfg.build.truncate)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(textmodel.__file__)),  # models from code: no pickled classes
                artifacts={"classifier": str(classifier), "vocabulary": str(vocabulary_file)},
                signature=infer_signature(INPUT_EXAMPLE, np.full(len(INPUT_EXAMPLE), 0.5)),  # [string] -> [double]
                input_example=INPUT_EXAMPLE,
                pip_requirements=_requirements(),  # stated, not inferred: inference reloads the model
                registered_model_name=cfg.evaluate.registered_model_name,
            )
        mlflow.set_tag("model_uri", info.model_uri)
