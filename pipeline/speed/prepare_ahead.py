"""prepare_ahead: the data stages in a worker process, while this process opens the run and loads TensorFlow.

The worker is a fresh interpreter (spawned: safe whatever threads run here) that calls the story's own
`prepare(cfg, step)` with a quiet copy of the run's Steps; the run takes its product and its Steps' seconds,
cache hits and lines when it needs the data. The worker is stopped as soon as its result is in, or when the
run ends first; Ctrl-C is the run's (the worker ignores it).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from contextlib import contextmanager

log = logging.getLogger(__name__)


def can_start(cfg) -> bool:
    """Only worth it while TensorFlow is still to load, and only safe in a main module started with -m
    (`python -m pipeline`, whose code is guarded): a spawned worker imports the main module again."""
    main = sys.modules["__main__"]
    return ("build" in cfg.stages and "tensorflow" not in sys.modules
            and getattr(main, "__spec__", None) is not None and multiprocessing.parent_process() is None)


def work(prepare, cfg, step):
    """In the worker: the data, and the Steps that made it (its seconds, hits and lines)."""
    return prepare(cfg, step), step


@contextmanager
def started(cfg, prepare, step):
    pool = multiprocessing.get_context("spawn").Pool(1, initializer=signal.signal,
                                                       initargs=(signal.SIGINT, signal.SIG_IGN))
    quiet = step.quiet()

    def prepared():
        try:
            data, done = pending.get()
        finally:
            pool.terminate()
        step.taken(done)
        return data

    try:
        pending = pool.apply_async(work, (prepare, cfg, quiet))
        log.info("ingest, split, vectorize: in a worker process while TensorFlow loads")
        yield prepared
    finally:
        pool.terminate()
