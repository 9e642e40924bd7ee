"""The tracked run kept by a process of its own, so that MLflow's share of a run stays off the fit's cores.

A fresh `python -m pipeline` forks a Recorder before it imports TensorFlow. The recorder process imports
MLflow, opens the run (tracking.TrackedRun) and imports what evaluation scores and draws with: about 4 s
of Python, on the core that TensorFlow's import leaves idle, at a lower priority so that it yields to
the fit. The training process makes the same calls on the Recorder as on a TrackedRun; they travel
through a pipe, in order, and the two that answer (the evaluation's metrics, the model's logging) are
waited for. The run ends as the training process says: FINISHED, FAILED with its error, or KILLED on
Ctrl-C or SIGTERM; KILLED, too, if that process disappears without a word.

Where a process cannot fork safely, or has used MLflow already (a sweep's jobs in one process, tests that
call runner.run), the runner keeps the TrackedRun in its own process; both record the same things.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)

NICENESS = 10  # the recorder's work waits while the fit needs the cores, and runs at once when they are free
ANSWERED = ("evaluation", "log_model")  # calls whose result (or error) the training process waits for


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run ends KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def outcome(kind, error) -> tuple[str, str | None]:
    """How a run ends, given the exception (type and value) that ended it, if any: (status, error text)."""
    if kind is None:
        return "FINISHED", None
    if issubclass(kind, KeyboardInterrupt):
        return "KILLED", None
    return "FAILED", f"{kind.__name__}: {error}"


class Signals:
    """Turns SIGINT and SIGTERM into Interrupted, but never inside a write to the tracking store (or to the
    recorder's pipe): an exception raised in the middle of a write can leave the store unable to record
    the run's end. A signal that arrives during a write is raised as soon as the write is done.

    Python runs a signal's handler wherever the main thread is, and that can be a finalizer or a weakref
    callback run by the garbage collector, where an exception is printed as "Exception ignored" and
    dropped: the Ctrl-C would be lost. Python hands such an exception to sys.unraisablehook; the one
    installed here sends the signal again a moment later, so that it lands outside."""

    REDELIVERY = 0.05  # seconds: long enough for the finalizer to return, short next to any stage

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writing = 0
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}
        self.previous_hook = None

    def install(self) -> None:
        if not self.enabled or threading.current_thread() is not threading.main_thread():  # e.g. a launcher's worker
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
        if self.previous_hook is not None:
            sys.unraisablehook, self.previous_hook = self.previous_hook, None

    def _unraisable(self, unraisable) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            self.previous_hook(unraisable)
            return
        resend = threading.Timer(self.REDELIVERY, os.kill, (os.getpid(), unraisable.exc_value.signum))
        resend.daemon = True
        resend.start()

    def _handle(self, signum, frame) -> None:
        if self.writing:
            self.pending = signum
        else:
            raise Interrupted(signum)

    @contextmanager
    def write(self):
        self.writing += 1
        try:
            yield
        finally:
            self.writing -= 1
            if not self.writing and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)

    @contextmanager
    def ending(self, status: str):
        """Around recording the run's end: a signal waits until it is recorded, then the handlers are
        restored. A signal that came meanwhile still stops the program once a run is recorded FINISHED
        (in a sweep: the jobs after this one); any other end has its own exception under way."""
        self.writing += 1
        try:
            yield
        finally:
            self.writing -= 1
            pending, self.pending = self.pending, None
            self.restore()
        if status == "FINISHED" and pending is not None:
            raise Interrupted(pending)


def can_fork() -> bool:
    """Whether this process can fork safely: Linux, no TensorFlow loaded (forking a process that runs
    TensorFlow's threads is not safe), no other thread, not a daemonic process (which may not have children)."""
    return (sys.platform == "linux" and "tensorflow" not in sys.modules and threading.active_count() == 1
            and not multiprocessing.current_process().daemon)


def start(cfg) -> "Recorder | None":
    """A Recorder for `cfg`'s run, where this process can fork one and has not loaded MLflow (whose store
    connections a forked process must not share: a sweep's parent run, a test session); else None."""
    if not can_fork() or "mlflow" in sys.modules:
        return None
    try:
        kept = Recorder(cfg)
    except OSError as error:  # cannot fork here: the run is kept in this process
        log.debug("no recorder process (%s)", error)
        return None
    log.info("tracking: the MLflow run is kept by a recorder process (pid %s)", kept.pid)
    return kept


class Recorder:
    """The training process's end of the tracked run: TrackedRun's methods, made in the recorder process."""

    def __init__(self, cfg):
        context = multiprocessing.get_context("fork")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_serve, name="pipeline-recorder", daemon=True,
                                        args=(cfg, child_end, self._pipe))
        self._process.start()
        child_end.close()
        self.pid = self._process.pid
        self._lock = threading.Lock()  # the fit thread logs epochs while the main thread makes other calls
        self._ended = False
        self.signals = Signals()
        self.signals.install()  # from now on an interrupt ends the run KILLED, whenever it comes

    def __enter__(self) -> "Recorder":
        """Wait until the run is open (raising what stopped it from opening)."""
        self._answer()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.close(kind, error)
        return False

    def close(self, kind=None, error=None) -> None:
        """End the run as the exception `error` of type `kind` (None: FINISHED) says, and wait until its end
        is recorded. Raises what the recorder failed with, unless the run already failed here."""
        if self._ended:
            return
        self._ended = True
        status, failure = outcome(kind, error)
        with self.signals.ending(status):
            failed = None
            try:
                self._send(("end", status, failure))
                while self._answer(ending=True) != "ended":
                    pass  # the answer to a call this process stopped waiting for when it was interrupted
            except Exception as problem:  # noqa: BLE001 - raised below, unless the run failed here already
                failed = problem
            finally:
                self._process.join(timeout=60)
                if self._process.is_alive():
                    self._process.terminate()
            if failed is not None and kind is None:
                raise failed

    def preload(self) -> None:
        """The recorder imports what it needs by itself."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            self._send(("ask" if name in ANSWERED else "call", name, args, kwargs))
            return self._answer() if name in ANSWERED else None

        return call

    def _send(self, message: tuple) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        with self._lock, self.signals.write() if in_main else nullcontext():  # whole messages only
            self._pipe.send(message)

    def _answer(self, ending: bool = False):
        """The recorder's next answer: its value, or (`ending`) its kind. Raises what the recorder failed with."""
        try:
            kind, value = self._pipe.recv()
        except (EOFError, OSError):
            self._process.join(timeout=10)
            raise RuntimeError(f"the recorder process ended unexpectedly (exit code {self._process.exitcode}); "
                               "see its log above") from None
        if kind == "failed":
            raise value
        return kind if ending else value


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        return RuntimeError(f"{type(error).__name__}: {error}")


def _serve(cfg, pipe, parent_end) -> None:
    """The recorder process: open the run, make the calls that arrive, end the run when told (or when the
    training process is gone)."""
    parent_end.close()
    for signum in (signal.SIGINT, signal.SIGTERM):  # the training process decides how the run ends
        signal.signal(signum, signal.SIG_IGN)
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    from pipeline import tracking

    run = tracking.TrackedRun(cfg, signals=False)
    try:
        run.__enter__()
    except BaseException as error:  # noqa: BLE001 - the training process raises it
        pipe.send(("failed", _portable(error)))
        return
    pipe.send(("opened", run.run.info.run_id))
    try:
        run.preload()
    except Exception:  # noqa: BLE001 - only a head start: evaluation imports (and reports) for itself
        log.debug("preloading failed", exc_info=True)

    def fail(error: Exception, what: str) -> BaseException:
        """End the run FAILED with `error`; what the training process will raise."""
        log.exception(what)
        run.end(*outcome(type(error), error))
        return _portable(error)

    failure = None
    while True:
        try:
            kind, *message = pipe.recv()
        except (EOFError, OSError):
            kind, message = "end", ["KILLED", "the training process ended before it ended the run"]
        except Exception as error:  # noqa: BLE001 - a message that cannot be read: the run fails with it
            if failure is None:
                failure = fail(error, "a call from the training process could not be read")
            pipe.send(("failed", failure))  # the answer to that call, if it wanted one; else read at the end
            continue
        if kind == "end":
            status, text = message
            if failure is None:
                run.end(status, text)
            try:
                pipe.send(("failed", failure) if failure is not None else ("ended", None))
            except OSError:  # the training process is gone
                pass
            return
        name, args, kwargs = message
        answer = None
        if failure is None:
            try:
                answer = ("done", getattr(run, name)(*args, **kwargs))
            except Exception as error:  # noqa: BLE001 - the run ends FAILED with it; the training process raises it
                failure = fail(error, f"recording {name} failed")
        if kind == "ask":
            pipe.send(answer if failure is None else ("failed", failure))
