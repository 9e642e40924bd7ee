"""A table's reviews vectorized as they are read from its file: chunk by chunk, on every core.

In: the split stage's Splits of a table whose texts stay in its file (each frame has the row number of each
review there, `row`; ingest's Reviews.table says which file and column), and a BuildConfig. Out: the vocabulary
and the train, validation and test id matrices, exactly as build.vectorize makes them from texts in memory
(tests/test_stages.py checks), ids kept compact (uint16 while the vocabulary fits). Two passes over the file:
the first counts the tokens of the training reviews (textmodel.adapt's counting), the second encodes every
review; each hands chunks of tables.CHUNK_ROWS texts to one worker process a core, at most WINDOW chunks a
worker in flight, so that memory holds the ids and a few chunks, never the whole text. The workers end with
the stage, whether it ends, fails or is interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline import tables, textmodel
from pipeline.console import Progress
from pipeline.tables import TableTexts

POOL_ROWS = 100_000  # fewer reviews than this are done in this process: a pool's start costs about a second
WINDOW = 2  # chunks in flight a worker: one at work, one waiting


def compact(ids: int):
    """The smallest type that holds `ids` ids (0 to ids - 1): 2 bytes a token up to 65,536 of them."""
    return np.uint16 if ids <= 1 << 16 else np.int32


def vectorize_table(splits, table: TableTexts, cfg, workers: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """(vocabulary, [x_train, x_validation, x_test]) of the reviews in `table`'s file that `splits` holds.
    `workers`: processes to use (default: one a core, none for fewer than POOL_ROWS reviews)."""
    rows = [part["row"].to_numpy() for part in (splits.train, splits.validation, splits.test)]
    size = max(int(numbers.max(initial=-1)) for numbers in rows) + 1
    part, place = np.full(size, -1, dtype=np.int8), np.zeros(size, dtype=np.int64)  # each file row: where it goes
    for code, numbers in enumerate(rows):
        part[numbers], place[numbers] = code, np.arange(len(numbers))
    if workers is None:
        workers = cores() if sum(map(len, rows)) >= POOL_ROWS and cores() > 1 and spawnable() else 0
    with Workers(workers) as pool:
        counts, shown = Counter(), Progress("vectorize: counting the training reviews' words", len(rows[0]))
        for chosen, counted in pool.map(textmodel.count, _chunks(table, part, place, train_only=True), ()):
            counts.update(counted)
            shown.update(shown.done + len(chosen[0]))
        shown.close()
        vocabulary = textmodel.ranked(counts, cfg.vocabulary_size)
        del counts
        ids = [np.zeros((len(numbers), cfg.sequence_length), dtype=compact(len(vocabulary))) for numbers in rows]
        shown = Progress("vectorize: encoding the reviews", sum(map(len, rows)))
        settings = (vocabulary, cfg.sequence_length, cfg.truncate, compact(len(vocabulary)))
        for (codes, places), encoded in pool.map(_encode, _chunks(table, part, place), settings):
            for code, x in enumerate(ids):
                x[places[codes == code]] = encoded[codes == code]
            shown.update(shown.done + len(codes))
        shown.close()
    return vocabulary, ids


def with_texts(splits, table: TableTexts):
    """`splits` with each review's text (column `text`) read from `table`'s file: what the bag families, which
    count n-grams over the training texts at once, need in memory."""
    parts = {name: getattr(splits, name) for name in ("train", "validation", "test")}
    texts = table.at(np.concatenate([part["row"].to_numpy() for part in parts.values()])).to_numpy()
    ends = np.cumsum([len(part) for part in parts.values()])
    return replace(splits, **{name: part.assign(text=texts[end - len(part):end])
                              for end, (name, part) in zip(ends, parts.items())})


def _chunks(table: TableTexts, part: np.ndarray, place: np.ndarray, train_only: bool = False) -> Iterator:
    """((codes, places), texts) of each chunk of the file: the texts of its reviews that go into the arrays (the
    training part's only, with `train_only`), which array each goes into (0 train, 1 validation, 2 test) and
    at which row."""
    for start, texts in table.chunks(tables.CHUNK_ROWS):
        numbers = np.arange(start, min(start + len(texts), len(part)))
        codes = part[numbers]
        chosen = np.flatnonzero(codes == 0 if train_only else codes >= 0)
        if len(chosen):
            yield (codes[chosen], place[numbers[chosen]]), [texts[i] for i in chosen]


_INDEX: list = [None, None]  # a worker's last vocabulary and its token index: built once, not once a chunk


def _encode(texts: list[str], vocabulary: list[str], length: int, truncate: str, dtype) -> np.ndarray:
    if _INDEX[0] != vocabulary:
        _INDEX[:] = vocabulary, textmodel.token_index(vocabulary)
    return textmodel.encode(_INDEX[1], texts, length, truncate).astype(dtype, copy=False)


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
        """(kept, function(texts, *settings)) for each (kept, texts) of `tasks`, in order, the tasks dealt to
        the workers in turn, at most WINDOW a worker in flight."""
        if not self.workers:
            for kept, texts in tasks:
                yield kept, function(texts, *settings)
            return
        pending: deque = deque()
        for number, (kept, texts) in enumerate(tasks):
            if len(pending) == WINDOW * len(self.workers):
                yield self._result(*pending.popleft())
            worker = self.workers[number % len(self.workers)]
            worker[1].send((function, (texts, *settings)))
            pending.append((kept, worker))
        while pending:
            yield self._result(*pending.popleft())

    @staticmethod
    def _result(kept, worker) -> tuple:
        try:
            done, result = worker[2].recv()
        except EOFError:
            raise RuntimeError(f"a vectorize worker ended with exit code {worker[0].exitcode}") from None
        if not done:
            raise result
        return kept, result


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
