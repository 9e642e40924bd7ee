"""A shared training's reached budgets recorded beside it (tracking/budgets.py): one thread, budgets in order.

`Recorder(copy)` records with `copy`, a model built as the training's was (so its saved files are the training
model's to the byte), loaded for each budget with the weights and optimizer state the training had there (what a
training of that budget alone leaves, and saves with the model): training never waits for a record. A budget's run
ends on the thread (its end time is its record's); the thread that opened it releases it (`collect`). A record that
fails fails every later one with the same error, and `collect` raises it: the training's failure. Off the main thread
no signal cuts a write (signals.py); an interrupt of the training waits for the budgets reached (`collect(wait=True)`);
a second one cuts the wait, and a record not yet begun is dropped, its run ended KILLED (`close`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Recorder:
    def __init__(self, copy):
        copy.optimizer.build(copy.trainable_variables)  # (its variables, to be loaded with the training's)
        self.copy = copy
        self.thread: ThreadPoolExecutor | None = None
        self.pending: list[tuple[object, Future]] = []  # each budget's run and its record, in order
        self.failure: BaseException | None = None  # a record that failed: every later one fails with it

    def submit(self, run, state: tuple[list, list], step, seconds: dict, work: Callable) -> None:
        """Record `run` on the thread: `work(copy)` with the copy holding `state` (state_of), the run's seconds
        `seconds` and `step`'s (its Steps), then its end."""
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="budget-records")
        self.pending.append((run, self.thread.submit(self._record, run, state, step, seconds, work)))

    def _record(self, run, state, step, seconds: dict, work: Callable) -> tuple[str | None, BaseException | None]:
        """On the thread: (what run.end() kept, the failure or None)."""
        from pipeline.console import CONSOLE

        run.log_own = list(run.log_own)  # (this record's lines: its run's log keeps them, the training's log does not)
        with CONSOLE.divert(run.log_own):
            return self._recorded(run, state, step, seconds, work)

    def _recorded(self, run, state, step, seconds: dict, work: Callable) -> tuple[str | None, BaseException | None]:
        from pipeline.tracking import forget_active_run

        failure = self.failure  # (an earlier record failed: this one fails with it, unrecorded)
        if failure is None:
            try:
                run.activate()
                load(self.copy, state)
                work(self.copy)
                run.complete()
            except BaseException as error:
                failure = self.failure = error
        run.seconds.update(seconds, **step.seconds)
        try:
            kept = run.end(type(failure) if failure else None, failure)
        finally:
            forget_active_run(run.run_id)
        return kept, failure

    def collect(self, wait: bool, strict: bool = True) -> None:
        """The runs whose record is done (with `wait`: all), released here; a record's failure raised (`strict`),
        or, without waiting, one heard of already."""
        from pipeline.tracking import RecordKept, TrackedRun

        failure = None
        while self.pending and (wait or self.pending[0][1].done()):
            run, future = self.pending[0]
            try:
                kept, error = future.result()
            except KeyboardInterrupt:  # (the wait cut, not the record: its run stays pending, its record goes on)
                raise
            except BaseException as unexpected:  # (the thread's own failure, or a record close() dropped)
                kept, error = None, unexpected
            self.pending.pop(0)
            run.release(restore=False)  # (the process's MLflow settings: put back once, at the training's end)
            if kept is not None:
                error = error or RecordKept(kept)
                TrackedRun.report(type(error), kept)
            failure = failure or error
        failure = failure or self.failure
        if failure is not None and strict:
            raise failure

    def close(self) -> None:
        """The thread ended; a run still pending (a second Ctrl-C cut the wait) released, and, if its record had not
        begun (dropped here), ended KILLED: none is left RUNNING."""
        if self.thread is not None:  # (nothing left to record, unless a second Ctrl-C cut the wait)
            self.thread.shutdown(wait=True, cancel_futures=True)
        while self.pending:
            run, future = self.pending.pop(0)
            try:
                if future.cancelled():
                    dropped = KeyboardInterrupt("its record was dropped: the training was interrupted")
                    run.end(KeyboardInterrupt, dropped)
            finally:
                run.release(restore=False)


def state_of(model, weights=None) -> tuple[list, list]:
    """The model's weights (or `weights`) and its optimizer's variables, as arrays: what the copy is loaded with."""
    return (weights if weights is not None else model.get_weights()), [v.numpy() for v in model.optimizer.variables]


def load(copy, state) -> None:
    weights, optimizer = state
    copy.set_weights(weights)
    if len(copy.optimizer.variables) != len(optimizer):
        raise RuntimeError(f"the model's copy has {len(copy.optimizer.variables)} optimizer variables, the model "
                           f"{len(optimizer)}")
    for variable, value in zip(copy.optimizer.variables, optimizer):
        variable.assign(value)
