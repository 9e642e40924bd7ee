"""One training recorded as several sweep jobs: each fit.epochs budget its own child run (pipeline/budgets.py plans).

SharedRuns stands where train() has one TrackedRun. It opens the shortest budget's run as training starts; each
epoch goes to the open run as it ends (epochs.py). When training reaches that budget, the run gets what a fit of
that many epochs alone would have given it (fit.fit hands over its Fitted: the curves so far, the best epoch within
the budget and that epoch's weights, the model at the budget's last epoch), its evaluation and checkpoints
(train.record), and ends FINISHED; the next budget's run opens with the same start, setup and the epochs so far
(each at the moment it ended), and training goes on. The longest budget's run is train()'s own to finish.

Each run says where it came from: the tag `pipeline.training` (the run the training started in, the same for every
budget of it), `pipeline.training.budgets`, and its description. An interrupt ends the open run KILLED with its
epochs, as a job of that budget alone would have been; the budgets not reached are not recorded (a resume runs them).
A failure ends the open run FAILED and records each later budget as FAILED with the same error.
"""

from __future__ import annotations

import logging
import tempfile
import time

from pipeline.config import PipelineConfig
from pipeline.signals import SIGNALS
from pipeline.tracking import TrackedRun

log = logging.getLogger(__name__)
TRAINING, BUDGETS = "pipeline.training", "pipeline.training.budgets"  # the tags each budget's run gets
NOTE = "mlflow.note.content"  # the run's description in MLflow's UI


class SharedRuns:
    """The runs of one training, one open at a time (`run`); anything else asked of it goes to the open run."""

    def __init__(self, cfg: PipelineConfig, budgets: list[PipelineConfig], step):
        self.queue = [*budgets, cfg]  # each budget's settings, shortest first; cfg (the longest) last
        self.budgets_written = ",".join(str(c.fit.epochs) for c in self.queue)
        self.step = step  # train()'s Steps: the longest budget's seconds; each shorter one gets a fresh one
        self.run: TrackedRun | None = None
        self.first: TrackedRun | None = None  # the run the training started in
        self.points: list[tuple[int, dict, int]] = []  # every epoch so far: (epoch, values, when it ended, ms)
        self.setup: list[tuple[str, tuple]] = []  # what each run records before its epochs (data, model summary)
        self.fit_started, self.paused = 0.0, 0.0  # perf_counter at the fit's start; seconds spent on budgets' records
        self.folder = tempfile.TemporaryDirectory(prefix="pipeline-budgets-")  # the first served model's files

    def __getattr__(self, name):
        return getattr(self.run, name)

    def __enter__(self) -> "SharedRuns":
        self._open()
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if "fit" in self.step.seconds:  # the longest budget's training time, without the shorter ones' records
            self.step.seconds["fit"] -= self.paused
        run, self.run = self.run, None
        try:
            if run is not None:
                run.__exit__(kind, error, tb)
        finally:
            self.folder.cleanup()
            if kind is not None and not issubclass(kind, KeyboardInterrupt):
                self._failed(error, self.queue[1:] if run is not None else self.queue)
        return False

    def _open(self) -> None:
        cfg, budgets = self.queue[0], self.budgets_written
        run = TrackedRun(cfg, self.step.seconds if len(self.queue) == 1 else {})
        run.start = self.first.start if self.first else time.time()  # every budget's run starts with the training
        run.__enter__()
        self.run = run
        if self.first is None:
            self.first = run
        else:
            run.log_from = self.first.log_from  # its log: the training's, from its start
        first = self.first.run_id
        run.journal.tags({TRAINING: first, BUDGETS: budgets, NOTE: (
            f"Recorded from a training shared by the fit.epochs budgets {budgets.replace(',', ', ')} of this sweep job: one "
            f"training to {self.queue[-1].fit.epochs} epochs, started in run {first}"
            f"{' (this run)' if first == run.run_id else ''}. This run's epochs 1-{cfg.fit.epochs} are that training's, "
            "recorded as each ended, and its checkpoints are its weights at the best epoch within the budget and at "
            f"epoch {cfg.fit.epochs}: the numbers a training of {cfg.fit.epochs} epochs alone gives (same seed). Its "
            "start is the training's. sweep.share_budgets=false trains each budget alone.")})
        for method, args in self.setup:
            getattr(run, method)(*args)
        for epoch, values, stamp in self.points:
            run.epochs.record(epoch, values, stamp)
        if self.points:
            run.epochs.beat()

    def _failed(self, error, budgets: list[PipelineConfig]) -> None:
        """Each budget not reached, as a FAILED run that says why (a job of that budget alone would have failed alike)."""
        from pipeline.tracking import sweeps

        for cfg in budgets:
            try:
                sweeps.record_failed_job(cfg.tracking.run_name, error)
            except Exception as failure:  # (the store itself may be why)
                log.warning("could not record budget %s as failed (%s)", cfg.fit.epochs, failure)

    def data(self, prepared) -> None:
        self.setup.append(("data", (prepared,)))
        self.run.data(prepared)

    def model_summary(self, *args) -> None:
        self.setup.append(("model_summary", args))
        self.run.model_summary(*args)

    def log_models(self, model, encoded, cfg: PipelineConfig, kept) -> str:
        """The budget's checkpoints as LoggedModels; after the first budget, its served model is laid out as the
        first's (MLflow's serving check ran on that one: the same code, vocabulary, signature and example)."""
        from pipeline.tracking import checkpoints

        return checkpoints.log_models(self.run, model, encoded, cfg, kept, layout=f"{self.folder.name}/served")

    def epoch_logger(self):
        """TrackedRun's epoch callback, writing through this object (`epochs`): to the open run, and remembered."""
        return TrackedRun.epoch_logger(self)

    @property
    def epochs(self) -> "SharedRuns":
        return self

    def record(self, epoch: int, values: dict[str, float]) -> int:
        stamp = self.run.epochs.record(epoch, values)
        self.points.append((epoch, values, stamp))
        return stamp

    def budgets(self, model, record) -> dict:
        """fit.fit's arguments for the shorter budgets: their epochs, and what to do when training reaches one
        (`record(run, step, cfg, fitted)`: train.record, with the model and data bound)."""
        self.fit_started = time.perf_counter()

        def reached(fitted) -> None:
            began, weights = time.perf_counter(), model.get_weights()
            cfg, run, step = self.queue[0], self.run, type(self.step)(self.step.cfg, self.step.store)
            seconds = dict(self.step.seconds)  # the data stages and build, shared
            record(self, step, cfg, fitted)  # (into the open run: this budget's)
            run.complete()
            run.seconds.update(seconds, fit=began - self.fit_started - self.paused, **step.seconds)
            self.run = None
            with SIGNALS.held():  # ended, and the next budget's run opened, or neither
                self.queue.pop(0)  # (from here on a failure is the later budgets')
                run.__exit__(None, None, None)
                model.set_weights(weights)
                self._open()
            self.paused += time.perf_counter() - began

        return {"budgets": [cfg.fit.epochs for cfg in self.queue[:-1]], "reached": reached}

