"""Ctrl-C and SIGTERM as a KILLED run: never in the middle of a write to the store, never lost.

SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt), which ends the run KILLED; inside `held()`
(opening the run, queueing an epoch, recording the end) a signal waits until the block is done, as an
exception in the middle of a write could leave the store unable to record the end. A handler that runs
inside a finalizer (where Python prints "Exception ignored" and drops the exception) has its signal
sent again a moment later by the sys.unraisablehook installed here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """One per process (SIGNALS): installed once, from the start of `python -m pipeline` or of the first run."""

    REDELIVERY = 0.05  # seconds: long enough for the finalizer to return, short next to any stage

    def __init__(self) -> None:
        self.holding = 0
        self.pending: int | None = None
        self.previous_hook = None
        self.start_held = False

    def install(self, held: bool = False) -> None:
        """Turn SIGINT and SIGTERM into Interrupted from now on (once; in the main thread only). `held`:
        hold them until the first run is open (`release`), so that one from the first moments ends it KILLED."""
        if threading.current_thread() is not threading.main_thread() or self.previous_hook is not None:
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        self.holding += held
        self.start_held = held

    def release(self) -> None:
        """The first run is open: a signal held since the start is raised now."""
        if self.start_held:
            self.start_held = False
            with self.held():
                self.holding -= 1

    def _handle(self, signum, frame) -> None:
        if self.holding:
            self.pending = signum
        else:
            raise Interrupted(signum)

    def _unraisable(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            self.previous_hook(unraisable)
            return
        resend = threading.Timer(self.REDELIVERY, os.kill, (os.getpid(), unraisable.exc_value.signum))
        resend.daemon = True
        resend.start()

    @contextmanager
    def held(self):
        """A signal that arrives inside waits until the block is done, then is raised (even when the
        block raised: an interrupted end of a FINISHED run still stops the program)."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


SIGNALS = Signals()
