"""What the terminal shows, and the full log each run keeps as its artifact logs/run.log.

By default (verbose=false) the terminal shows one line per stage with its seconds, Keras's epoch lines
and the result. What the libraries write to the process's standard error themselves (TensorFlow's and
XLA's start-up lines, MLflow's notices) goes to the log only; Python's standard error (a traceback, a
download's progress bar) goes to both; log records all go to the log, and to the terminal only the
pipeline's and Hydra's own, and any library's errors. verbose=true leaves the terminal as the libraries
make it (their C/C++ lines are then on the terminal only; the log keeps every log record). Installed by
`python -m pipeline` at each job, never by the library: `train(cfg)` from a notebook leaves standard error alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Iterator

log = logging.getLogger("pipeline")
FULL = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class Tee:
    """Python's standard error: written to the terminal and to the log."""

    def __init__(self, terminal, full):
        self.terminal, self.full = terminal, full

    def write(self, text: str) -> int:
        self.full.write(text)
        return self.terminal.write(text)

    def flush(self) -> None:
        self.full.flush()
        self.terminal.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ...: the terminal's
        return getattr(self.terminal, name)


def calm(record: logging.LogRecord) -> bool:
    return record.name.startswith(("pipeline", "hydra")) or record.levelno >= logging.ERROR


class Console:
    def __init__(self) -> None:
        self.reader = None  # the log, read back (binary); None until install
        self.diverted: dict[int, list[str]] = {}  # a thread's records kept apart from the log (divert), by thread

    def install(self, verbose: bool) -> None:
        """The log file and standard error once a process (the first job's `verbose` decides); the log
        handlers at every job, as Hydra sets up logging anew for each job of a sweep."""
        if self.reader is None:
            handle, path = tempfile.mkstemp(prefix="pipeline-", suffix=".log")
            self.reader = open(path, "rb")  # (what each run keeps of it: since)
            os.unlink(path)  # nameless: nothing is left behind, however the process ends (each run has kept its part)
            self.full = os.fdopen(handle, "a", buffering=1, encoding="utf-8", errors="replace")
            self.handler = logging.StreamHandler(self.full)
            self.handler.setFormatter(logging.Formatter(FULL))
            self.handler.addFilter(self._into_the_log)
            self.verbose = verbose
            logging.captureWarnings(True)  # Python's warnings as log records: to the log, not the terminal
            made = logging.getLogRecordFactory()

            def record(*args, **kwargs) -> logging.LogRecord:  # (a diverted thread's: once the handlers are set)
                if threading.get_ident() in self.diverted:
                    self._handlers_set()
                return made(*args, **kwargs)

            logging.setLogRecordFactory(record)
            if not verbose:
                sys.stderr.flush()
                terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
                os.dup2(handle, 2)  # what TensorFlow, XLA and child processes write to standard error: the log only
                sys.stderr = Tee(terminal, self.full)
        for logger in (logging.getLogger("mlflow"), logging.getLogger()):  # (MLflow's records do not reach the root)
            for shown in logger.handlers if not self.verbose else ():  # Hydra's and MLflow's console handlers
                if shown is not self.handler and type(shown) is logging.StreamHandler and calm not in shown.filters:
                    shown.addFilter(calm)  # the pipeline's lines, plainly; on a terminal, over a progress bar
                    clear = "\r\x1b[K" if getattr(shown.stream, "isatty", lambda: False)() else ""  # (the worker's)
                    shown.setFormatter(logging.Formatter(clear + "%(message)s"))
            if self.handler not in logger.handlers:  # (last: the root's, once set, says the handlers are: _handlers_set)
                logger.addHandler(self.handler)

    def _handlers_set(self, patience: float = 10.0) -> None:
        """Wait (at most `patience` seconds) while Hydra sets logging up anew for a sweep's next job, until install()
        has set this log's handler again: a record going on beside that job (tracking/budgets.py) keeps each of its
        lines in its own log, and the terminal shows them as the others."""
        deadline = time.monotonic() + patience
        while self.handler not in logging.getLogger().handlers and time.monotonic() < deadline:
            time.sleep(0.02)

    def keep(self, text: str) -> None:
        """Into the log only (the traceback of a run that failed or was interrupted: its terminal is spared it)."""
        if self.reader is not None:
            self.full.write(text)

    def offset(self) -> int:
        """Where the log ends now: a run keeps the log from here."""
        return os.fstat(self.reader.fileno()).st_size if self.reader else 0

    def since(self, offset: int, until: int | None = None) -> str | None:
        """The log from `offset` (to `until`, else its end); None where no log is kept (a notebook)."""
        if self.reader is None:
            return None
        sys.stderr.flush()
        end = os.fstat(self.reader.fileno()).st_size if until is None else until
        parts = []  # (pread: no shared position, as runs on two threads read it)
        while offset < end and (part := os.pread(self.reader.fileno(), end - offset, offset)):
            parts.append(part)
            offset += len(part)
        return b"".join(parts).decode("utf-8", errors="replace")

    @contextlib.contextmanager
    def divert(self, lines: list[str]) -> Iterator[list[str]]:
        """Inside, this thread's log records go into `lines` (as the log writes them), not into the process's log:
        a budget recorded beside its training keeps its record's lines in its own log, and out of the others'."""
        thread = threading.get_ident()
        self.diverted[thread] = lines
        try:
            yield lines
        finally:
            del self.diverted[thread]

    def _into_the_log(self, record: logging.LogRecord) -> bool:
        lines = self.diverted.get(record.thread)
        if lines is None:
            return True
        lines.append(self.handler.format(record) + "\n")
        return False


def stage(name: str, seconds: float | None, detail: str = "") -> None:
    """One stage's line: its name, seconds and what it made."""
    took = f"{seconds:6.1f} s" if seconds is not None else ""
    log.info("%s", f"{name:<16} {took:>8}  {detail}".rstrip())


PROGRESS = (2.0, 10.0)  # Progress: seconds before its first line; seconds between lines where it cannot redraw


class Progress:
    """A long stage's progress: "<what>: 420,000 of 1,000,000 reviews, 41,000 a second, 14 s left". Nothing for
    the first 2 seconds (a short stage shows only its line); then, on a terminal, one line redrawn in place at
    most 4 times a second and erased at the end, and elsewhere (a log, a notebook) a line at most every 10
    seconds. On standard error or output, whichever is a terminal, else on standard output (in the worker
    that prepares the data, standard error is the run's log)."""

    def __init__(self, what: str, total: int | None = None, unit: str = "reviews"):
        self.what, self.total, self.unit, self.after, self.every = what, total, unit, *PROGRESS
        self.start = time.monotonic()
        self.last = self.start - self.every  # (the first line as soon as `after` has passed)
        self.stream = next((s for s in (sys.stderr, sys.stdout) if getattr(s, "isatty", lambda: False)()), None)
        self.drawn, self.done = False, 0

    def update(self, done: int, share: float | None = None) -> None:
        """`done` rows so far; `share`, the part of the work done, where `total` is not known."""
        now, self.done = time.monotonic(), done
        if now - self.start < self.after or now - self.last < (0.25 if self.stream else self.every):
            return
        self.last, took = now, now - self.start
        share = done / self.total if self.total else share
        of = f" of {self.total:,}" if self.total else ""
        left = f", {took * (1 - share) / share:.0f} s left" if share else ""
        line = f"{self.what}: {done:,}{of} {self.unit}, {done / took:,.0f} a second{left}"
        if self.stream:
            print(f"\r\x1b[K{line}", end="", file=self.stream, flush=True)
            self.drawn = True
        else:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.drawn:  # the stage's own line follows
            print("\r\x1b[K", end="", file=self.stream, flush=True)
            self.drawn = False


CONSOLE = Console()
