"""A sweep's shared trainings whose last budget's record goes on after their job returned (tracking/budgets.py,
SharedRuns with `later`): LATER, opened by the sweep's BudgetSweeper (pipeline/budgets.py) around its launches and
settled as they end, before the analysis, and on an interrupt or a failure before that goes on: each record reached is
finished whole (a second Ctrl-C drops those not begun, their runs KILLED), a record's failure ends its run FAILED and
is logged as its job's, and MLflow's settings are put back as the first training kept found them.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import wait
from contextlib import contextmanager

from pipeline.console import CONSOLE
from pipeline.signals import SIGNALS

log = logging.getLogger(__name__)


class Later:
    """The shared trainings of a sweep's jobs whose longest budget's record goes on after their job returned (SharedRuns,
    `later`): accepted only in the process and on the thread that opened it (BudgetSweeper's; a joblib or Ray worker's
    job records whole before it returns), and settled there."""

    def __init__(self) -> None:
        self.owner: tuple[int, int] | None = None  # (process, thread) that settles
        self.pending: list = []  # each a SharedRuns
        self.found = None  # the first kept training's first run (a TrackedRun): MLflow's settings as it found them

    def accepting(self) -> bool:
        return self.owner == (os.getpid(), threading.get_ident())

    def keep(self, shared) -> None:
        """`shared` kept until its records are done; those kept before whose records are, closed now (their threads
        and model copies do not pile up over a long sweep)."""
        done = [each for each in self.pending if each.recorded()]
        self.pending = [each for each in self.pending if all(each is not closed for closed in done)] + [shared]
        self.found = self.found or shared.first
        self._close(done, None)

    def _close(self, trainings: list, kind) -> None:
        for shared in trainings:
            try:
                shared.close(kind, restore=False)
            except Exception as failure:  # (a failed job does not stop the sweep: the analysis lists it)
                log.error("sweep job %s: its record failed: %s", shared.name, failure)

    @contextmanager
    def opened(self):
        """A context (around a sweep's launches) whose jobs may leave their last record to finish; settled as it ends."""
        self.owner, interrupted = (os.getpid(), threading.get_ident()), False
        try:
            yield self
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.owner = None
            self.settle(interrupted)

    def settle(self, interrupted: bool = False) -> None:
        """Each pending training's records finished (a Ctrl-C meanwhile waits for them, then is raised; a second cuts
        the wait: records not begun are dropped, their runs KILLED), in the order kept; a record's failure logged as its
        job's (its run ended FAILED on the thread); MLflow's settings put back as the first training kept found them."""
        pending, self.pending = self.pending, []
        if pending and CONSOLE.reader is not None:  # (the last job's handlers: set, unless it stopped before its own)
            CONSOLE.install(CONSOLE.verbose)
        interrupt = None  # a Ctrl-C that comes now: the records are finished first (a second one cuts the wait)
        if interrupted:
            SIGNALS.ended()  # (the interrupt is here, not lost: not sent again to cut the wait)
        try:
            for shared in pending:
                futures = shared.records()
                while any(not future.done() for future in futures):
                    try:
                        wait(futures)
                    except KeyboardInterrupt as cut:
                        if interrupted or interrupt is not None:
                            raise
                        interrupt = cut
                        SIGNALS.ended()
        finally:
            try:
                self._close(pending, KeyboardInterrupt if interrupted or interrupt is not None else None)
            finally:
                if self.found is not None:
                    self.found.restore()
                    self.found = None
        if interrupt is not None:
            raise interrupt  # the sweep stops on it: its parent ends KILLED, with the command that resumes it


LATER = Later()
