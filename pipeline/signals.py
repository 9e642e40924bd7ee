"""Ctrl-C and SIGTERM as a KILLED run: never in the middle of a write to the store, never lost.

SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt), which ends the run KILLED; inside `held()`
(opening the run, queueing an epoch, recording the end) a signal waits until the block is done, as an
exception in the middle of a write could leave the store unable to record the end.

A raised Interrupted can be lost: inside a finalizer Python drops it (printing "Exception ignored", which
the sys.unraisablehook installed here keeps quiet), and C code that calls back into Python (a dict lookup
calling __eq__, an attribute check) may clear it, or turn it into an error of its own (`behind` finds the
signal behind such an error). So a signal is sent again every REDELIVERY seconds,
by a thread of its own, until a run has ended on it or `held` raised it (`ended`): a SIGTERM never leaves
training running.

Installed by `python -m pipeline` (the process is the command line's); `train(cfg)` called from a notebook or
another program leaves signals alone: there a KeyboardInterrupt still ends the run KILLED. `installed()`
sets them up for a block and puts back what it found.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """One per process (SIGNALS): installed once, from the start of `python -m pipeline`."""

    REDELIVERY = 0.5  # seconds: long enough to end a run on the signal, short next to a user's patience

    def __init__(self) -> None:
        self.holding = 0
        self.pending: int | None = None
        self.received: int | None = None  # the signal no run has ended on yet
        self.previous_hook = None
        self.previous_handlers: dict[int, object] = {}
        self.stop = threading.Event()

    def install(self) -> None:
        """Turn SIGINT and SIGTERM into Interrupted from now on (once; in the main thread only)."""
        if threading.current_thread() is not threading.main_thread() or self.previous_hook is not None:
            return
        self.previous_handlers = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        self.stop.clear()
        # a polling thread, not a timer started by the handler: the handler may run while the main thread
        # holds any lock, so it takes none
        self.thread = threading.Thread(target=self._redeliver, name="signal-redelivery", daemon=True)
        self.thread.start()

    def uninstall(self) -> None:
        """Put back the handlers and hook found by `install`, and stop the redelivery thread."""
        if self.previous_hook is None:
            return
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        sys.unraisablehook, self.previous_hook = self.previous_hook, None
        self.stop.set()
        self.thread.join()
        self.holding, self.pending, self.received = 0, None, None

    @contextmanager
    def installed(self) -> Iterator["Signals"]:
        """SIGINT and SIGTERM as Interrupted inside the block only (a test, or a program of its own)."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def behind(self, error: BaseException) -> KeyboardInterrupt | None:
        """The interrupt behind `error`, if any: `error` itself, or the signal received and not yet acted on when
        another error came. C code that calls back into Python may turn the Interrupted raised inside into an
        error of its own (pydantic building a model's validator, as MLflow imports, raises a SchemaError)."""
        if isinstance(error, KeyboardInterrupt):
            return error
        if self.received is not None and isinstance(error, Exception):
            interrupt = Interrupted(self.received)
            interrupt.__context__ = error
            return interrupt
        return None

    def ended(self) -> None:
        """A run has ended KILLED on the signal: it was not lost, and is not sent again."""
        self.received = None

    def _redeliver(self) -> None:
        while not self.stop.wait(self.REDELIVERY):
            if (signum := self.received) is not None:
                os.kill(os.getpid(), signum)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if self.holding:
            self.pending = signum
        else:
            raise Interrupted(signum)

    def _unraisable(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):  # (one that is: sent again, see above)
            self.previous_hook(unraisable)

    @contextmanager
    def held(self):
        """A signal that arrives inside waits until the block is done, then is raised (even when the
        block raised: an interrupted end of a FINISHED run still stops the program). Off the main thread it holds
        nothing: signals reach the main thread alone, so a write on another thread is never cut by one."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding and self.pending is not None:
                signum, self.pending = self.pending, None
                self.ended()  # raised here, in plain code, it is not lost
                raise Interrupted(signum)


SIGNALS = Signals()
