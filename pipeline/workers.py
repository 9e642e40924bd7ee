"""Worker processes for a stage's chunked work (pipeline/chunks.py): one a core, each spawned, each with its own
pipes, all ended with the stage whether it ends, fails or is interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from typing import Callable, Iterable, Iterator

WINDOW = 2  # chunks in flight a worker: one at work, one waiting


def spawnable() -> bool:
    """Whether a spawned worker can start: it runs the main module's file again, if it has one (not for `python -`)."""
    main = sys.modules["__main__"]
    file = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or file is None or os.path.isfile(file)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """`size` worker processes, or with size 0 none (the work is done here). Each is spawned (safe whatever
    threads run here), ignores Ctrl-C (its parent's) and has a pipe of its own each way, no lock shared with
    the others: ending them, at the end, on an error or an interrupt, is killing them."""

    def __init__(self, size: int):
        self.size, self.workers = size, []

    def __enter__(self) -> "Workers":
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        try:
            for _ in range(self.size):
                tasks, send = context.Pipe(duplex=False)
                receive, results = context.Pipe(duplex=False)
                process = context.Process(target=_serve, args=(tasks, results), daemon=True, name="vectorize")
                process.start()
                tasks.close(), results.close()  # (the worker's ends: its death ends a wait on it)
                self.workers.append((process, send, receive))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        workers, self.workers = self.workers, []
        for process, send, receive in workers:
            end(process)
            send.close(), receive.close()

    def map(self, function: Callable, tasks: Iterable[tuple], settings: tuple) -> Iterator[tuple]:
        """(kept, function(work, *settings), worker) for each (kept, work) of `tasks`, in order, the tasks dealt
        to the workers in turn (worker: its number, 0 when there are none), at most WINDOW a worker in flight."""
        if not self.workers:
            for kept, work in tasks:
                yield kept, function(work, *settings), 0
            return
        pending: deque = deque()
        for number, (kept, work) in enumerate(tasks):
            if len(pending) == WINDOW * len(self.workers):
                yield self._result(*pending.popleft())
            worker = self.workers[number % len(self.workers)]
            worker[1].send((function, (work, *settings)))
            pending.append((kept, worker, number % len(self.workers)))
        while pending:
            yield self._result(*pending.popleft())

    @staticmethod
    def _result(kept, worker, number) -> tuple:
        try:
            done, result = worker[2].recv()
        except EOFError:
            raise RuntimeError(f"a vectorize worker ended with exit code {worker[0].exitcode}") from None
        if not done:
            raise result
        return kept, result, number


def end(process, grace: float = 0.0) -> None:
    """End a child process: SIGTERM and up to `grace` seconds to end itself, else (or with no grace) SIGKILL;
    then reap it. A KeyboardInterrupt meanwhile (a second Ctrl-C, the run's signal sent again) waits until the
    process is gone, then is raised."""
    interrupted, deadline = None, time.monotonic() + grace
    (process.terminate if grace else process.kill)()
    while process.exitcode is None:
        try:
            process.join(max(deadline - time.monotonic(), 0.0) if grace else None)
            if process.exitcode is None:
                process.kill()
                grace = 0.0
        except KeyboardInterrupt as error:
            interrupted = error
    if interrupted is not None:
        raise interrupted


def _serve(tasks, results) -> None:
    """A worker: take tasks (function, arguments) as they come (a thread reads them, so that the parent's
    sending never waits on this worker's sending), do them in order, send back (True, result) or (False, error)."""
    import queue
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    waiting: queue.Queue = queue.Queue()

    def read():
        try:
            while True:
                waiting.put(tasks.recv())
        except (EOFError, OSError):
            waiting.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (task := waiting.get()) is not None:
        function, arguments = task
        try:
            result = (True, function(*arguments))
        except Exception as error:
            result = (False, error)
        try:
            results.send(result)
        except (BrokenPipeError, OSError):
            return
