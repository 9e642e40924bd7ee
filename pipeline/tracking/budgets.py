"""One training recorded as several sweep jobs: each fit.epochs budget its own child run (pipeline/budgets.py plans).

SharedRuns stands where train() has one TrackedRun. It opens the shortest budget's run as training starts; each
epoch goes to the open run as it ends (epochs.py). When training reaches that budget, the run gets what a fit of
that many epochs alone would have given it (fit.fit hands over its Fitted: the curves so far, the best epoch within
the budget and that epoch's weights, the model at the budget's last epoch), its evaluation and checkpoints
(train.record), and ends FINISHED; the next budget's run opens with the same start, setup and the epochs so far
(each at the moment it ended), and training goes on. The longest budget's run is train()'s own to finish.

Training does not wait for the next budget's run to open: a thread of its own ("budget-runs") opens it, and the
epochs that end meanwhile wait in the list of every epoch so far, which the run takes as it opens. Training waits
for it at the next budget, at its end, and on an interrupt (an open is not cut: the run then ends KILLED); an open
that fails is the training's failure, heard at the next epoch.

A reached budget is recorded beside the training while it goes on (recorder.py: one thread, budgets in order, a copy
of the model holding the budget's weights and optimizer state). The longest budget's record waits for the others
(their failure is the training's; their models are registered first); the thread ends with the training, and the
process's MLflow settings are put back as the first run found them.

In a sweep's job run by the sweep's own process (the in-process launcher; sweep.overlap_records, on by default), the
longest budget is recorded like the shorter ones, on the thread, and the job returns as training ends: the record goes
on while the sweep's next job starts, on the core training leaves it. The job's SharedRuns waits in LATER
(later.py), which the sweep settles before its analysis.

Each run says where it came from: the tag `pipeline.training` (the run the training started in, the same for every
budget of it), `pipeline.training.budgets`, and its description. An interrupt ends the open run KILLED with its
epochs, as a job of that budget alone would have been; the budgets not reached are not recorded (a resume runs them).
A failure ends the open run FAILED and records each later budget as FAILED with the same error.

A sweep's early-stopping reference job (sweep.early_stopping_reference) whose settings are these but for early
stopping and fit.epochs is recorded from the training too (`reference`): Keras's EarlyStopping watches its epochs
(stopping nothing, fit.py) and, at the epoch where it would have ended that job's fit, the reference's run gets what
the job alone gives (same seed: early stopping only stops): the epochs so far, the stopped and best epochs, the best
weights restored and evaluated. Its failure is the training's.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from pipeline.config import PipelineConfig
from pipeline.console import CONSOLE
from pipeline.signals import SIGNALS
from pipeline.tracking import TrackedRun, active_runs, forget_active_run
from pipeline.tracking.epochs import now_ms
from pipeline.tracking.later import LATER
from pipeline.tracking.recorder import Recorder, state_of
from pipeline.tracking.sweeps import TRAINING

log = logging.getLogger(__name__)
BUDGETS = "pipeline.training.budgets"  # the tags each budget's run gets: this, and TRAINING
NOTE = "mlflow.note.content"  # the run's description in MLflow's UI


class SharedRuns:
    """The runs of one training, one open at a time (`run`); anything else asked of it goes to the open run."""

    def __init__(self, cfg: PipelineConfig, budgets: list[PipelineConfig], step, reference=None):
        self.queue = [*budgets, cfg]  # each budget's settings, shortest first; cfg (the longest) last
        self.reference: PipelineConfig | None = reference  # the early-stopping reference job's settings
        self.budgets_written = ",".join(str(c.fit.epochs) for c in self.queue)
        self.step = step  # train()'s Steps: the longest budget's seconds; each shorter one gets a fresh one
        self.run: TrackedRun | None = None  # (None while the next budget's run opens: `opening`)
        self.first: TrackedRun | None = None  # the run the training started in
        self.points: list[tuple[int, dict, int]] = []  # every epoch so far: (epoch, values, when it ended, ms)
        self.lock = threading.Lock()  # an epoch goes to the open run, or waits in points for the one opening
        self.opener: ThreadPoolExecutor | None = None  # opens each budget's run after the first
        self.opening: Future | None = None  # the next budget's run, being opened
        self.opened: list[PipelineConfig] = []  # the settings whose runs exist
        self.setup: list[tuple[str, tuple]] = []  # what each run records before its epochs (data, model summary)
        self.fit_started, self.paused = 0.0, 0.0  # perf_counter at the fit's start; seconds training waited on budgets
        self.folder = tempfile.TemporaryDirectory(prefix="pipeline-budgets-")  # the first served model's files
        self.recorder: Recorder | None = None  # records the budgets reached while training goes on (budgets())
        self.reached = None  # budgets()'s: hands the open budget's run, reached, to the recorder
        # the longest budget recorded like the others, its record left to finish beside the sweep's next job (LATER)
        self.later = cfg.sweep.overlap_records and LATER.accepting()
        self.name = cfg.tracking.run_name

    def __getattr__(self, name):
        return getattr(self.run, name)

    def __enter__(self) -> "SharedRuns":
        self._open()
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None and self.later and not self.queue:  # every budget handed to the recorder: it goes on
            LATER.keep(self)
            return False
        self.close(kind, error, tb)
        return False

    def close(self, kind=None, error=None, tb=None, restore: bool = True) -> None:
        """The training's runs ended: the records reached finished (a failure of theirs raised, unless `kind`), the open
        run ended as `kind` says, the threads gone, MLflow's settings put back (`restore`); the budgets not reached,
        FAILED."""
        if "fit" in self.step.seconds:  # the longest budget's training time, without the shorter ones' records
            self.step.seconds["fit"] -= self.paused
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            SIGNALS.ended()  # (the interrupt is here, not lost: not sent again to cut the wait for the records)
        run = None
        try:
            try:  # budgets reached are recorded whole before the open run ends (on an interrupt too)
                self._opened(strict=False)  # (a wait no interrupt cuts: the run being opened is open after it)
                if self.recorder is not None:
                    self.recorder.collect(wait=True, strict=kind is None)
            finally:
                run, self.run = self.run, None
                try:
                    if run is not None:
                        run.__exit__(kind, error, tb)
                finally:
                    if self.recorder is not None:
                        self.recorder.close()
        finally:
            if self.opener is not None:
                self.opener.shutdown()
            if self.first is not None and restore:
                self.first.restore()  # (later runs opened before the first had ended: what the first found)
            self.folder.cleanup()
            if kind is not None and not issubclass(kind, KeyboardInterrupt):
                self._failed(error, [cfg for cfg in self.queue if all(cfg is not each for each in self.opened)])

    def _open(self) -> None:
        self.run = self._start(self.queue[0])

    def _open_next(self) -> None:
        """The next budget's run opened on the opener's thread (MLflow's active run there: none after)."""
        cfg = self.queue[0]
        if self.opener is None:
            self.opener = ThreadPoolExecutor(1, thread_name_prefix="budget-runs")

        def opened() -> None:
            run = self._start(cfg, opening=True)
            forget_active_run(run.run_id)

        self.opening = self.opener.submit(opened)

    def _opened(self, strict: bool = True) -> None:
        """Training waits for the next budget's run to be open; with `strict`, its failure raised, then an interrupt
        that came meanwhile (it does not cut the wait: the open takes a moment, and the run then ends KILLED)."""
        future, self.opening, interrupt = self.opening, None, None
        while future is not None and not future.done():
            try:
                wait([future])
            except KeyboardInterrupt as cut:
                interrupt = cut
        if strict and future is not None and future.exception() is not None:
            raise future.exception()
        if strict and interrupt is not None:
            raise interrupt

    def _start(self, cfg: PipelineConfig, stopped: int | None = None, opening: bool = False) -> TrackedRun:
        """A run for `cfg` (a budget; `stopped`: the early-stopping reference, its last epoch), opened with the
        training's start, its setup and the epochs so far, and tagged with where it comes from. `opening`: the next
        budget's, opened beside the training (the open run from then on)."""
        budgets = self.budgets_written
        run = TrackedRun(cfg, self.step.seconds if len(self.queue) == 1 and stopped is None else {})
        run.start = self.first.start if self.first else time.time()  # every budget's run starts with the training
        run.code = self.first.code if self.first else None  # (the code that trains them all)
        try:
            run.__enter__()
        finally:
            if run.run_id is not None:  # its run exists (ended FAILED by __enter__ if it could not open: not again)
                self.opened.append(cfg)
        if self.first is None:
            self.first = run
        else:
            run.log_from = self.first.log_from  # its log: the training's, from its start
        first = self.first.run_id
        shared = (f"Recorded from a training shared by the fit.epochs budgets {budgets.replace(',', ', ')} of this sweep "
                  f"job: one training to {self.queue[-1].fit.epochs} epochs, started in run {first}"
                  f"{' (this run)' if first == run.run_id else ''}. ")
        if stopped is None:
            note = (f"This run's epochs 1-{cfg.fit.epochs} are that training's, recorded as each ended, and its "
                    "checkpoints are its weights at the best epoch within the budget and at "
                    f"epoch {cfg.fit.epochs}: the numbers a training of {cfg.fit.epochs} epochs alone gives (same seed).")
        else:
            note = (f"Early stopping with this run's settings would have ended a training of {cfg.fit.epochs} epochs "
                    f"at epoch {stopped} (it stops nothing but the training, and the same seed gives the same epochs): "
                    f"this run's epochs 1-{stopped} are that training's, and its checkpoints the weights early stopping "
                    "would have left: the numbers this job alone gives.")
        try:
            run.journal.tags({TRAINING: first, BUDGETS: budgets, NOTE: (
                f"{shared}{note} Its start is the training's. sweep.share_budgets=false trains each job alone.")})
            for method, args in self.setup:
                getattr(run, method)(*args)
            with self.lock:  # (the epochs that ended while it opened, then the next ones: in order, each once)
                for epoch, values, stamp in self.points:
                    run.epochs.record(epoch, values, stamp)
                if self.points:
                    run.epochs.beat()
                if opening:
                    self.run = run
        except BaseException as error:  # (open, but not the training's: ended here, not left RUNNING)
            run.__exit__(type(error), error, error.__traceback__)
            raise
        return run

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

    def log_models(self, model, encoded, cfg: PipelineConfig, kept, run: TrackedRun | None = None) -> str:
        """The budget's checkpoints as LoggedModels (into `run`, else the open one); after the first budget, its
        served model is laid out as the first's (MLflow's serving check ran on that one: the same code, vocabulary,
        signature and example)."""
        from pipeline.tracking import checkpoints

        return checkpoints.log_models(run or self.run, model, encoded, cfg, kept, layout=f"{self.folder.name}/served")

    def records(self) -> list[Future]:
        """The records handed to the recorder and not yet collected."""
        return [future for _, future in self.recorder.pending] if self.recorder is not None else []

    def recorded(self) -> bool:
        """Whether every record handed to the recorder is done."""
        return all(future.done() for future in self.records())

    def complete(self) -> None:
        """(The longest budget's run, unless it was handed to the recorder, which marks it complete when recorded.)"""
        if self.run is not None:
            self.run.complete()

    def fitted(self, fitted) -> None:
        """The longest budget's record begins, here: its run open (active in MLflow on this thread), and the shorter
        ones' finished first (a failure of theirs is the training's, and their models are registered before its own)."""
        self._opened()
        if self.recorder is not None:
            self.recorder.collect(wait=True)
        if self.run is not self.first:  # (opened on the opener's thread)
            self.run.activate()
        self.run.fitted(fitted)

    def epoch_logger(self):
        """TrackedRun's epoch callback, writing through this object (`epochs`): to the open run, and remembered."""
        return TrackedRun.epoch_logger(self)

    @property
    def epochs(self) -> "SharedRuns":
        return self

    def record(self, epoch: int, values: dict[str, float]) -> int:
        with self.lock:
            stamp = self.run.epochs.record(epoch, values) if self.run is not None else now_ms()
            self.points.append((epoch, values, stamp))
        if self.opening is not None and self.opening.done() and self.opening.exception() is not None:
            self._opened()  # (the next budget's run could not be opened: the training fails with it)
        return stamp

    def budgets(self, model, record, make) -> dict:
        """fit.fit's arguments for the shorter budgets: their epochs, and what to do when training reaches one
        (`record(run, step, cfg, fitted, model=...)`: train.record, with the data bound). `make()` builds a model as
        `model` was built: the recorder's copy, whose saved files are then a model of `model`'s to the byte."""
        self.recorder = Recorder(make())  # (made before fit seeds the training)
        self.fit_started = time.perf_counter()

        def reached(fitted) -> None:
            """(Also the longest budget's, when its record is left to finish later: train() calls it.)"""
            began, state = time.perf_counter(), state_of(model)
            self._opened()  # (this budget's run, if it is still being opened)
            self.recorder.collect(wait=False)  # (a budget whose record failed: the training fails with it)
            cfg, run = self.queue[0], self.run
            with SIGNALS.held():  # the budget's run handed to the recorder, and the next budget's opening, or neither
                self.queue.pop(0)  # (from here on a failure is the later budgets')
                with self.lock:
                    self.run = None
                run.log_until = CONSOLE.offset()  # its log: the training's until here, then its record's lines
                if run is self.first:
                    forget_active_run(run.run_id)  # (opened on this thread; the others on the opener's)
                if self.queue:
                    self._open_next()
                else:  # (the longest: its seconds its record's own, not train()'s, which it shared)
                    run.seconds = {}
                self._submit(run, cfg, fitted, state, began, record)
            self.paused += time.perf_counter() - began

        self.reached = reached
        arguments = {"budgets": [cfg.fit.epochs for cfg in self.queue[:-1]], "reached": reached}
        if self.reference is not None:
            arguments["stopping"] = (self.reference.fit.early_stopping, self.reference.fit.epochs,
                                     functools.partial(self._stopped, model, record))
        return arguments

    def _stopped(self, model, record, fitted, weights) -> None:
        """Where early stopping would have ended the reference job's fit: its run opened and handed to the recorder
        (the open budget's run stays open); recorded with the weights Keras would have left (the best, restored)."""
        began, state, cfg = time.perf_counter(), state_of(model, weights), self.reference
        self.recorder.collect(wait=False)
        self.reference = None
        active = active_runs()  # MLflow's active run, the open budget's: the reference's while it opens
        held = list(active)
        active.clear()
        try:
            with SIGNALS.held():
                run = self._start(cfg, stopped=len(fitted.history))
                run.log_until = CONSOLE.offset()  # (its log: the training's until its run opened, then its record's)
                forget_active_run(run.run_id)
                self._submit(run, cfg, fitted, state, began, record)
        finally:
            active[:] = held  # (the reference's run off it, however its opening went)
        self.paused += time.perf_counter() - began

    def _submit(self, run: TrackedRun, cfg: PipelineConfig, fitted, state, began: float, record) -> None:
        """`run` (a budget's, or the reference's, reached at `began`) handed to the recorder: its record, with the
        model's copy; its seconds the data stages' and build's (shared) and its fit's up to then."""
        step = type(self.step)(self.step.cfg, self.step.store)
        seconds = {**self.step.seconds, "fit": began - self.fit_started - self.paused}
        self.recorder.submit(run, state, step, seconds,
                             lambda copy: record(_Budget(self, run), step, cfg, fitted, model=copy))


class _Budget:
    """A reached budget's run as train.record sees it on the recorder: that run's, and its models laid out as the
    training's first."""

    def __init__(self, shared: SharedRuns, run: TrackedRun):
        self.shared, self.run = shared, run

    def __getattr__(self, name):
        return getattr(self.run, name)

    def log_models(self, model, encoded, cfg: PipelineConfig, kept) -> str:
        return self.shared.log_models(model, encoded, cfg, kept, run=self.run)

