"""The one package that speaks to MLflow; here, what a run records, when, and how it ends.

A TrackedRun opens as the run's work starts (its start time is the process's, for the first run of a
process) and records: every setting as a flat dotted param, the data set as a dataset input, tags (git
commit, package versions, per-stage seconds, cache hits), per-epoch curves at step = epoch, each with
the time its epoch ended, the test metrics, artifacts (config, model summary, history, figures) and the
raw-text model. It ends FINISHED, FAILED with the error, or KILLED on Ctrl-C, SIGTERM or a KeyboardInterrupt,
holding every epoch finished before; a watchdog process (watchdog.py), told each epoch as it ends
(epochs.py), ends it KILLED with them if the process is killed outright. Nothing here changes the process
(signals, environment, threads): that is the command line's. The sweep's parent run and its analysis are sweeps.py's.
Every write goes through the run's journal (journal.py): if the tracking server stops answering, the run goes on,
its writes are kept on disk and written when the server answers again, or by the command the run's end prints.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.tracking import fluent

import pipeline
from pipeline import config
from pipeline.config import EXPERIMENT, PARENT_RUN
from pipeline.console import CONSOLE
from pipeline.signals import SIGNALS
from pipeline.tracking import checkpoints, models
from pipeline.tracking.epochs import CURVES, Epochs
from pipeline.tracking.projects import project_run
from pipeline.tracking import journal
from pipeline.tracking.journal import QUICK, Journal
from pipeline.tracking.models import versions
from pipeline.tracking.server import check_reachable, ui_links

log = logging.getLogger(__name__)
MLFLOW_ENVIRONMENT = ("MLFLOW_", "_MLFLOW_")  # MLflow's fluent API sets and clears some of these as it goes
HEADLINE = ("test_accuracy", "test_loss", "best_val_loss", "best_val_loss_epoch", "epochs_trained")


def use(uri: str | None) -> str:
    """Point the MLflow client at `uri` (None: as config.tracking_uri decides), creating a new SQLite store
    one process at a time: MLflow migrates a new database without a lock, and two runs started at once
    into a fresh mlflow.db would both migrate it and one would fail half-way."""
    uri = check_reachable(uri or config.tracking_uri(config.TrackingConfig()))
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        path = os.path.abspath(uri.split("?", 1)[0].removeprefix("sqlite:///"))
        name = hashlib.sha256(path.encode()).hexdigest()[:16]  # a lock file in the temp folder, not beside the store
        with FileLock(Path(tempfile.gettempdir()) / f"pipeline-store-{name}.lock"):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates the store, or finds it current
    return uri


def git_tags() -> dict[str, str]:
    """The commit this code is at, and whether its tracked files have changed since (empty outside git)."""
    try:
        commit, changes = (subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                          timeout=10, check=True).stdout.strip()
                           for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(bool(changes))}


class RecordKept(ConnectionError):
    """The run has ended, but its tracking server did not answer again: its record is kept on disk. The
    message's last line is the command that writes it."""


def recorded(method):
    """A TrackedRun method that writes to the store: whole or not at all (SIGNALS.held); then the watchdog
    hears that the process was alive."""
    @functools.wraps(method)
    def recording(self, *args, **kwargs):
        with SIGNALS.held():
            result = method(self, *args, **kwargs)
        if self.epochs is not None:
            self.epochs.beat()
        return result

    return recording


class TrackedRun:
    """Context manager around one MLflow run (under `mlflow run`, its run or one it points to; in a sweep, a child
    of the sweep's parent). Each write to the store is held (SIGNALS.held): whole, or not at all."""

    first_in_process, start = True, None  # the first run of a process started with it; `start`: given (budgets.py)
    code: dict[str, str] | None = None  # git_tags(), or given: a shared training's later budgets get the first's
    # its logs/run.log: the process's log from log_from (to log_until: a budget's end), then log_own (budgets.py)
    log_from, log_until, log_own = 0, None, ()

    def __init__(self, cfg: config.PipelineConfig, seconds: dict[str, float] | None = None):
        self.cfg, self.run_id, self.experiment_id, self.run_name = cfg, None, None, None
        self.seconds = seconds if seconds is not None else {}  # each stage's, filled as the run goes; tags at its end
        self.headline: dict[str, float] = {}  # what the closing log line reports
        self.watchdog: subprocess.Popen | None = None
        self.epochs: Epochs | None = None
        self.environment: dict[str, str] = {}  # MLflow's environment variables as the run found them
        # the caller's tracking URI (None: not set) and active experiment, put back at the end (no public getter)
        self.found = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None, fluent._active_experiment_id
        self.journal: Journal | None = None  # every write of the run, to the store or kept on disk (journal.py)

    def __enter__(self) -> "TrackedRun":
        # the first run of `python -m pipeline` starts with the process (a sweep's jobs later); in a notebook,
        # a run starts when it is opened
        first = pipeline.COMMAND_LINE and TrackedRun.first_in_process and not os.environ.get(PARENT_RUN)
        start = self.start or (pipeline.STARTED if first else time.time())
        self.log_from = 0 if first else CONSOLE.offset()  # the first run's log is the process's from its start
        TrackedRun.first_in_process = False
        self.environment = {key: value for key, value in os.environ.items() if key.startswith(MLFLOW_ENVIRONMENT)}
        # (a progress bar per artifact clutters the terminal, and tqdm's monitor thread would outlive the run)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for key, value in QUICK.items():  # a lost server noticed in seconds, not minutes (put back at the end)
            os.environ.setdefault(key, value)
        try:
            uri = config.tracking_uri(self.cfg.tracking)
            with SIGNALS.held():  # a Ctrl-C now waits until the run exists, then ends it KILLED
                uri = use(config.tracking_uri(self.cfg.tracking))
                client, name = mlflow.MlflowClient(), self.cfg.tracking.run_name
                if os.environ.get(PARENT_RUN):
                    run = client.create_run(os.environ[EXPERIMENT], start_time=int(start * 1000), run_name=name,
                                            tags={"mlflow.parentRunId": os.environ[PARENT_RUN]})
                elif os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: its run, or a new one it points to
                    run = project_run(client, os.environ["MLFLOW_RUN_ID"], self.cfg.tracking.experiment_name, name, start)
                else:  # (in a notebook's own active run, in this store: its child)
                    experiment = mlflow.set_experiment(self.cfg.tracking.experiment_name)
                    run = client.create_run(experiment.experiment_id, start_time=int(start * 1000), run_name=name,
                                            tags=caller_as_parent(client, active_runs()))
                self.run_id, self.experiment_id, self.run_name = run.info.run_id, run.info.experiment_id, run.info.run_name
                self.journal = Journal(uri, self.run_id)
                mlflow.start_run(run_id=self.run_id, nested=True)  # (over a caller's active run, left active after)
                self.watchdog = subprocess.Popen(  # ends the run KILLED if this process is killed outright
                    [sys.executable, str(Path(__file__).with_name("watchdog.py")), uri, self.run_id,
                     str(self.journal.folder)], stdin=subprocess.PIPE, start_new_session=True)
                self.epochs = Epochs(self.journal, self.watchdog.stdin)
                self._record_setup()
                self.epochs.beat()
        except BaseException as error:
            self.__exit__(type(error), error, None)
            if journal.lost(error):  # the server went away as the run was being opened: one line, not MLflow's
                raise ConnectionError(f"the tracking server {config.redact('uri', uri)} stopped answering as the run "
                                      f"was opened ({journal.reason(error)}); start it, and run again") from None
            raise
        log.info("MLflow run %s (%s) in experiment %s at %s", self.run_id, run.info.run_name,
                 run.info.experiment_id, config.redact("uri", uri))
        return self

    def __exit__(self, kind, error, tb) -> bool:
        converted = None
        if error is not None and not isinstance(error, KeyboardInterrupt):
            converted = SIGNALS.behind(error)  # an interrupt that C code turned into an error of its own: KILLED
        if converted is not None:
            kind, error = type(converted), converted
        try:
            kept = self.end(kind, error)
        finally:
            self.release()
        self.report(kind, kept)
        if converted is not None:
            raise converted  # the program stops on the signal, as on any interrupt
        return False  # a failing or interrupted run: its own exception propagates

    def end(self, kind=None, error=None) -> str | None:
        """The run's record finished and its end written: FINISHED, KILLED (a KeyboardInterrupt) or FAILED (any other
        `kind`). None, or while the tracking server is lost past the wait, what report() says (the record is kept).
        From any thread (a shared training's budgets, budgets.py); release() then, from the thread that opened it."""
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        if status == "KILLED":
            SIGNALS.ended()
        with SIGNALS.held():
            if self.epochs is not None:
                self.epochs.close()  # every epoch recorded so far is written (or kept) before the end
            if self.run_id is not None:
                self._end(status, kind, error)
        if self.journal is not None and not self.journal.live:  # a lost server: wait for it a little (not on Ctrl-C)
            if not self.journal.finish(self.cfg.tracking.wait_for_server if status != "KILLED" else 0):
                return (f"the tracking server {config.redact('uri', self.journal.uri)} did not answer again: run "
                        f"{self.run_id}'s record ({status}) is kept in {self.journal.folder}. Once the server is back, "
                        f"write it with:\npython -m pipeline.replay {shlex.quote(str(self.journal.folder))}")
        return None

    def activate(self) -> None:
        """The run MLflow's active run on this thread (what mlflow.pyfunc.log_model logs into): a run recorded on
        another thread than the one that opened it (budgets.py). Not while the server is lost (the journal keeps)."""
        if self.journal.live:
            try:
                mlflow.start_run(run_id=self.run_id, nested=True)
            except Exception as error:
                if not journal.lost(error):
                    raise
                self.journal.lose(error)

    def release(self, restore: bool = True) -> None:
        """The run's helpers gone (its journal's prober, its watchdog), and, with `restore`, what the run changed in
        the process put back: MLflow's tracking URI, experiment and environment variables as the run found them."""
        if self.journal is not None:
            self.journal.stop()
        if self.watchdog is not None:
            self.watchdog.communicate(b"ended\n")  # the run has ended (or its end is kept): the watchdog leaves
            self.watchdog = None
        if restore:
            self.restore()

    def restore(self) -> None:
        mlflow.set_tracking_uri(self.found[0])
        fluent._active_experiment_id = self.found[1]
        for key in [key for key in os.environ if key.startswith(MLFLOW_ENVIRONMENT)]:
            os.environ.pop(key)  # (set_tracking_uri and set_experiment export theirs for subprocesses)
        os.environ.update(self.environment)

    @staticmethod
    def report(kind, kept: str | None) -> None:
        """A record kept on disk (end() said so): an error for a run that finished, else the last line after the
        interrupt's or the error's."""
        if kept is None:
            return
        if kind is None:
            raise RecordKept(kept)
        log.warning("%s", kept)

    def _end(self, status: str, kind, error) -> None:
        """The run's last writes (seconds, log, error) and its end, then the line that says how it ended."""
        if status != "FINISHED":  # the log keeps the traceback the terminal is spared
            CONSOLE.keep("".join(traceback.format_exception(error)))
        try:
            self.journal.tags({f"seconds.{stage}": f"{value:.2f}" for stage, value in self.seconds.items()})
            if (full := CONSOLE.since(self.log_from, self.log_until)) is not None:
                self.journal.text(full + "".join(self.log_own), "logs/run.log")
        except Exception as failure:  # the seconds and log are a record of the run; its end matters more
            log.warning("could not keep the run's seconds and log (%s)", failure)
        if status == "FAILED":
            self.journal.tags({"error": f"{kind.__name__}: {error}"[:5000]})
        self.journal.end(status)
        forget_active_run(self.run_id)
        if status == "KILLED":  # the one line an interrupt prints
            kept = self.epochs.recorded if self.epochs else 0
            log.info("MLflow run %s ended KILLED (%s), %d epoch%s kept", self.run_id, error or kind.__name__,
                     kept, "s" * (kept != 1))
            if error is not None:
                error.reported = True  # (python -m pipeline then exits without another word)
        else:
            headline = "".join(f", {name} {self.headline[name]:.4g}" for name in HEADLINE if name in self.headline)
            log.info("MLflow run %s ended %s%s%s", self.run_id, status, headline,
                     ui_links(mlflow.get_tracking_uri(), self.experiment_id, self.run_id))

    def _record_setup(self) -> None:
        self.journal.params(config.flatten(self.cfg))
        found = versions()
        tags = {f"version.{name.removesuffix('-cpu')}": version for name, version in found.items()}
        self.code = self.code if self.code is not None else git_tags()
        self.journal.tags({"pipeline.stages": ",".join(self.cfg.stages), **self.code, **tags})
        self.journal.text(config.recorded_yaml(self.cfg), "config/config.yaml")

    @recorded
    def data(self, prepared) -> None:
        """What the data stages produced (train.Data): the dataset input, split sizes, labels, cache hits."""
        meta = prepared.reviews
        self.journal.dataset(meta["source"], meta["digest"], meta["counts"], context="training")
        self.journal.tags({"data.digest": meta["digest"], **{f"cache.{k}": v for k, v in prepared.cache.items()}})
        if prepared.sizes:
            self.journal.params({f"data.{name}_rows": count for name, count in prepared.sizes.items()})
        self.journal.params({f"data.label_{name}": value for name, value in meta["labels"].items()})
        if self.cfg.ingest.skip_bad_rows:  # nothing left out silently: how many, and which
            self.journal.metrics({"data.skipped_rows": len(meta["skipped"])})
            if meta["skipped"]:
                import pandas as pd

                skipped = pd.DataFrame(meta["skipped"], columns=["row", "reason"]).to_csv(index=False)
                self.journal.text(skipped, "data/skipped_rows.csv")

    @recorded
    def model_summary(self, text: str, parameters: int, device: dict[str, str]) -> None:
        self.journal.tags(device)  # where it trains: device, device.name
        self.journal.text(text, "model_summary.txt")
        self.journal.metrics({"model.parameters": parameters})

    def epoch_logger(self):
        """A Keras callback that records each epoch's curves and seconds as it ends, stamped with that
        moment, before Keras prints it (epochs.py: training does not wait for the store)."""
        import keras

        run = self

        class RecordEpochs(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.began = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                values = {k: float(v) for k, v in (logs or {}).items() if k in CURVES}
                values["epoch_seconds"] = time.perf_counter() - self.began  # the first includes compiling
                with SIGNALS.held():  # whole, or not at all
                    run.epochs.record(epoch + 1, values)

        return RecordEpochs()

    @recorded
    def fitted(self, fitted) -> None:
        self.journal.text(fitted.history.to_csv(index=False), "history.csv")
        summary = fitted.summary()
        self.journal.metrics(summary)
        self.headline.update(summary)

    @recorded
    def evaluation(self, kept) -> None:
        """The served checkpoint's test metrics and figures, and best.* and last.* (evaluate.Checkpoints)."""
        result = kept.evaluation
        checkpoints.record(self.journal, kept)
        self.journal.metrics(result.metrics)
        self.headline.update(result.metrics)
        for name, figure in result.figures.items():
            self.journal.figure(figure, f"figures/{name}")

    def log_models(self, model, encoded, cfg: config.PipelineConfig, kept) -> str:
        """Every checkpoint of `kept` as a LoggedModel, the served one first (checkpoints.py); its URI."""
        return checkpoints.log_models(self, model, encoded, cfg, kept)

    @recorded
    def log_model(self, model, encoded, cfg: config.PipelineConfig, step=0, tags=None, name="model") -> str | None:
        """The raw-text pyfunc at `step` (its epoch), logged (models.py); its URI, or None while the server is lost."""
        return models.log(self.journal, model, encoded, cfg, step, tags, name)

    def save_model(self, model, encoded, cfg: config.PipelineConfig, path: str) -> None:
        """The same model, saved at `path` (not logged)."""
        models.save(model, encoded, cfg, path)

    @recorded
    def complete(self) -> None:
        """Mark the run as having done every stage it was asked for (what a resumed sweep looks for)."""
        self.journal.tags({"pipeline.complete": "true"})


def forget_active_run(run_id: str) -> None:
    """Leave MLflow's fluent active run `run_id` (this thread's) without writing to the store: the run's end was
    written (or kept) by its journal. (mlflow.end_run would write the end again, and fail while the server is lost.)"""
    import threading

    stack = active_runs()
    stack[:] = [active for active in stack if active.info.run_id != run_id]
    if threading.current_thread() is threading.main_thread():
        os.environ.pop("MLFLOW_RUN_ID", None)


def caller_as_parent(client: mlflow.MlflowClient, stack: list) -> dict[str, str]:
    """The tag that makes a run the child of the caller's active run (a notebook's `with mlflow.start_run():` around
    train), when that run is in the store `client` writes to; else none."""
    if not stack:
        return {}
    try:
        return {"mlflow.parentRunId": client.get_run(stack[-1].info.run_id).info.run_id}
    except mlflow.exceptions.MlflowException:  # (another store's run)
        return {}


def active_runs() -> list:
    """MLflow's fluent stack of this thread's active runs (MLflow 3.18: a thread-local list; no public handle)."""
    return fluent._active_run_stack.get()
