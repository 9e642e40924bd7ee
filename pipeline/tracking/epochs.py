"""Each epoch as it ends, to the store and to the run's watchdog: a SIGKILL loses none the terminal printed.

`record` writes the epoch's values as one JSON line to the watchdog's pipe (microseconds, before Keras
prints the epoch), then queues them for a thread of the run's own that writes them through the run's journal
(journal.py: to the store, or kept on disk while the server is lost), so that training never waits for the
store; the run's end joins that thread (`close`). `beat` tells the watchdog
that the process is alive. If the process dies, the watchdog writes the epochs the store lacks and ends
the run at the last moment it was known alive (watchdog.py).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

from mlflow.entities import Metric

log = logging.getLogger(__name__)
CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")  # what each epoch records (with epoch_seconds)


def now_ms() -> int:
    return int(time.time() * 1000)


class Epochs:
    """Not MLflow's async logging: its threads outlive the run, and it needs a process-wide environment
    variable to end a run promptly; a library must leave both as it found them."""

    INTERVAL = 1.0  # seconds of epochs written in one request (one a few milliseconds long would cost more)

    def __init__(self, journal, pipe):
        self.journal, self.pipe = journal, pipe
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.writer: threading.Thread | None = None
        self.closing = threading.Event()
        self.recorded = 0  # epochs handed over: in the store (or kept) once `close` has returned

    def tell(self, message: dict) -> None:
        """One line to the watchdog. A watchdog that is gone is not the run's failure: training goes on."""
        if self.pipe is None:
            return
        try:
            self.pipe.write(json.dumps(message).encode() + b"\n")
            self.pipe.flush()
        except (OSError, ValueError) as error:  # BrokenPipeError, or a pipe closed already
            self.pipe = None
            log.warning("the run's watchdog is gone (%s): a process killed outright now leaves the run RUNNING", error)

    def beat(self) -> None:
        self.tell({"time": now_ms()})

    def record(self, step: int, values: dict[str, float], stamp: int | None = None) -> int:
        """The epoch `step`'s values, stamped now (or at `stamp`, when it ended: a shared training's, budgets.py)."""
        stamp = stamp or now_ms()
        self.tell({"time": stamp, "step": step, "values": values})
        self.queue.put([Metric(key, value, stamp, step) for key, value in values.items()])
        self.recorded += 1
        if self.writer is None:
            self.writer = threading.Thread(target=self._write, name="epoch-writer", daemon=True)
            self.writer.start()
        return stamp

    def _write(self) -> None:
        while True:
            closing = self.closing.wait(self.INTERVAL)  # at once when the run ends
            metrics = []
            while not self.queue.empty():
                metrics += self.queue.get()
            if metrics:
                try:
                    self.journal.points(metrics)  # (a lost server: kept on disk, written when it answers)
                except Exception as error:  # refused by the store: the run's other writes tell more
                    log.warning("%d epoch values could not be written (%s)", len(metrics), error)
            if closing:
                return

    def close(self) -> None:
        """Every epoch recorded so far is written or kept (or a warning said which could not be)."""
        if self.writer is not None:
            self.closing.set()
            self.writer.join()
            self.writer = None
            self.closing.clear()
