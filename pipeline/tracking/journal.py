"""A run's writes, kept on disk while its tracking server does not answer: a lost server loses nothing.

Every write of a TrackedRun is one operation through its Journal: params, tags, metric points (each with its
own time and step), a text or a file as an artifact, the dataset input, a saved model folder (a LoggedModel),
the run's end. While the server answers, each is written at once. On the first write that cannot reach it,
the terminal says so once, and from then on the operations are kept in order in `mlflow-pending/<run id>/`
of the folder the command runs from (`operations.jsonl`, one JSON object a line, and the files they name);
the server is asked every PROBE seconds and, once it answers, they are written in order and the run is
recorded live again. What is still kept when the run ends is written by `python -m pipeline.replay FOLDER`
(operations.py: writing an operation again changes nothing; `written.txt` counts those written so far).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.config import redact
from pipeline.tracking.operations import ABOUT, OPERATIONS, WRITTEN, apply, fail_model, png, write_kept
from pipeline.tracking.server import check_reachable

log = logging.getLogger(__name__)
PENDING = "mlflow-pending"  # under the folder the command runs from: one folder per run whose writes are kept
# MLflow's client retries an unreachable server with backoff for minutes (7 retries, a 120 s timeout); during a
# run a lost server is noticed in seconds instead and its writes are kept. A user's own settings of these win.
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def lost(error: BaseException) -> bool:
    """Did `error` come from a server that does not answer (refused, reset, timed out, 5xx after retries)?
    Any other error (a refused value, a bug) is not kept for later: it is raised."""
    import requests
    from mlflow.exceptions import MlflowException

    seen, depth = error, 0
    while seen is not None and depth < 10:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, requests.HTTPError) and seen.response is not None and seen.response.status_code >= 500:
            return True
        if isinstance(seen, MlflowException) and re.search(r"failed with (timeout )?exception|error code 5\d\d", str(seen)):
            return True
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    return False


def reason(error: BaseException) -> str:
    """The gist of a connection error (MLflow's own message runs to several hundred characters)."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(timed out)|error code (5\d\d)", text)
    return next((g for g in found.groups() if g), text[:120]) if found else text[:120]


def as_kept(metrics: list[Metric], model: str | None = None) -> list[list]:
    """Metric points as an operation keeps them: [key, value, timestamp, step, the model's name or None]."""
    return [[m.key, m.value, m.timestamp, m.step, model] for m in metrics]


class Journal:
    PROBE = 3.0  # seconds between asking a lost server whether it answers again

    def __init__(self, uri: str, run_id: str, root: Path | None = None):
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)
        self.folder = (root or Path.cwd() / PENDING).absolute() / run_id
        self.lock = threading.RLock()  # one writer at a time, in order (the epochs' thread and the run's)
        self.kept: list[dict] | None = None  # the operations since the server was lost; None: writing live
        self.written = 0  # of them, written since
        self.models: dict[str, str] = {}  # a model's name in this run -> its model_id, once logged
        self.history: dict[str, list[Metric]] = {}  # every point of the run's own metrics, by key, as recorded
        self.prober: threading.Thread | None = None
        self.closing = threading.Event()

    # -- the run's writes --------------------------------------------------------------------------------------
    def params(self, values: dict) -> None:
        self.write({"op": "params", "params": {k: str(v) for k, v in values.items()}})

    def tags(self, values: dict) -> None:
        self.write({"op": "tags", "tags": {k: str(v) for k, v in values.items()}})

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        stamp = int(time.time() * 1000)
        self.points([Metric(key, float(value), stamp, step) for key, value in values.items()])

    def points(self, metrics: list[Metric], model: str | None = None) -> None:
        """Metric points with their own times; `model`: linked to that model of the run (by its name)."""
        if model is None:
            for point in metrics:
                self.history.setdefault(point.key, []).append(point)
        self.write({"op": "metrics", "points": as_kept(metrics, model)})

    def text(self, text: str, path: str) -> None:
        self.write({"op": "text", "text": text, "path": path})

    def figure(self, figure, path: str) -> None:
        self.write({"op": "figure", "figure": figure, "path": path})

    def dataset(self, source: str, digest: str, counts: dict[str, int], context: str) -> None:
        self.write({"op": "dataset", "source": source, "digest": digest, "counts": counts, "context": context})

    def model(self, folder: str, name: str, step: int, tags: dict, registered: str | None = None,
              link_step: bool = False) -> None:
        """A saved model folder as the run's LoggedModel `name` at `step`, registered as `registered`;
        `link_step`: link the run's metrics at that step to it, as mlflow's log_model does."""
        self.write({"op": "model", "folder": str(folder), "name": name, "step": step, "tags": tags,
                    "registered": registered, "link_step": link_step})

    def model_uri(self, name: str) -> None:
        """The run's `model_uri` tag: the URI of its model `name`."""
        self.write({"op": "model_uri", "model": name})

    def end(self, status: str) -> None:
        self.write({"op": "end", "status": status, "end_time": int(time.time() * 1000)})

    # -- live, or kept ---------------------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.kept is None

    def write(self, operation: dict) -> None:
        if operation["op"] in ("params", "tags") and not operation[operation["op"]]:
            return  # (nothing to write)
        with self.lock:
            if self.kept is None:
                try:
                    apply(self.client, self.run_id, operation, self.models, self.folder)
                    return
                except Exception as error:
                    if not lost(error):
                        if operation["op"] == "model":  # (as MLflow's log_model does: never left PENDING)
                            fail_model(self.client, self.run_id, operation["name"], error)
                        raise
                    self.lose(error)
            self._keep(operation)

    def lose(self, error: BaseException) -> None:
        """The server did not answer: say so once, keep what follows, ask it again every PROBE seconds."""
        with self.lock:
            if self.kept is not None:
                return
            self.kept, self.written = [], 0
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / ABOUT).write_text(json.dumps({"uri": redact("uri", self.uri), "run_id": self.run_id}))
            (self.folder / OPERATIONS).write_text("")
            (self.folder / WRITTEN).write_text("0")
            log.warning("The tracking server %s does not answer (%s): the run goes on, and its record is kept in %s "
                        "until the server answers again", redact("uri", self.uri), reason(error), self.folder)
            self.closing.clear()
            self.prober = threading.Thread(target=self._probe, name="tracking-probe", daemon=True)
            self.prober.start()

    def _keep(self, operation: dict) -> None:
        """`operation` as data and files in the folder: a figure as its PNG, a model folder copied."""
        number = len(self.kept)
        files = self.folder / "files" / str(number)
        if operation["op"] == "figure":
            files.mkdir(parents=True)
            directory, _, name = operation["path"].rpartition("/")
            (files / name).write_bytes(png(operation["figure"]))
            operation = {"op": "file", "file": f"files/{number}/{name}", "path": directory or None}
        elif operation["op"] == "model":
            shutil.copytree(operation["folder"], files / "model")
            operation = {**operation, "folder": f"files/{number}/model"}
        with open(self.folder / OPERATIONS, "a") as kept:
            kept.write(json.dumps(operation) + "\n")
        self.kept.append(operation)

    def _probe(self) -> None:
        while not self.closing.wait(self.PROBE):
            if self.flush():
                return

    def flush(self) -> bool:
        """If the server answers, write what is kept, in order. True when nothing is left kept."""
        with self.lock:
            if self.kept is None:
                return True
            try:
                check_reachable(self.uri, timeout=3)
                self.written = write_kept(self.client, self.run_id, self.kept, self.written, self.folder, self.models)
            except Exception as error:
                if not lost(error):
                    log.warning("the kept record in %s could not be written (%s)", self.folder, error)
                return False
            log.warning("The tracking server %s answers again: the %d writes kept meanwhile are written, and the run "
                        "is recorded live", redact("uri", self.uri), len(self.kept))
            self.kept = None
            shutil.rmtree(self.folder, ignore_errors=True)
            return True

    def stop(self) -> None:
        """No more asking the server: the prober thread ends (a run's threads do not outlive it)."""
        self.closing.set()
        if self.prober is not None:
            self.prober.join()
            self.prober = None

    def finish(self, wait: float) -> bool:
        """At the run's end: True once everything is written, asking a lost server for up to `wait` seconds
        (a Ctrl-C stops waiting). False: the record stays kept in `folder`."""
        self.stop()
        deadline = time.monotonic() + wait
        try:
            while not self.flush():
                if time.monotonic() + self.PROBE > deadline:
                    return False
                time.sleep(self.PROBE)
        except KeyboardInterrupt:
            from pipeline.signals import SIGNALS

            SIGNALS.ended()  # (its run has ended already; the record is kept, and the command says how to write it)
            return self.live
        return True
