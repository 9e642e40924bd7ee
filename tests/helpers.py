"""Reading the MLflow store back the way a user would."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import mlflow
from mlflow import MlflowClient

from pipeline.tracking import CURVES  # the curves each run records, named once

PROJECT = Path(__file__).resolve().parents[1]



def runs(uri: str, experiment: str = "imdb-sentiment"):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"])


def created_store(uri: str) -> MlflowClient:
    """A client of the store at `uri`, created and migrated before a process under test writes to it.

    A test that polls a store while the process it started creates that store would run MLflow's schema
    migrations in two processes at once, and MLflow does not guard against that: the slower one can read a
    half-migrated schema and fail.
    """
    if uri.startswith("sqlite:///"):
        store_in(Path(uri.removeprefix("sqlite:///")).parent, Path(uri).name)
    client = MlflowClient(uri)
    client.search_experiments()
    return client


_MIGRATED: list[Path] = []  # the session's one store made by MLflow itself, copied by store_in


def store_in(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of an SQLite store `folder/name`, as MLflow creates it on first use: a copy of one store MLflow
    made for this session (its schema migrations cost about 2 s, which every test would otherwise repeat).
    A store already there is left as it is. The tests of a store made from nothing (the README's commands,
    tests/test_entrypoints.py) name a path of their own instead."""
    path = Path(folder) / name
    if not path.exists() and path.parent.is_dir():
        if not _MIGRATED:
            made = Path(tempfile.mkdtemp(prefix="migrated-store-"))
            atexit.register(shutil.rmtree, made, True)
            with contextlib.chdir(made):  # (its Default experiment's artifacts would go to ./mlruns, here)
                MlflowClient(f"sqlite:///{made / 'mlflow.db'}").search_experiments()
            _MIGRATED.append(made / "mlflow.db")
        shutil.copyfile(_MIGRATED[0], path)
    return f"sqlite:///{path}"


def assert_every_epoch_recorded(client: MlflowClient, run_id: str, epochs: int) -> None:
    """One point per epoch, steps 1..epochs, for each of the four curves."""
    for curve in CURVES + ("epoch_seconds",):
        steps = sorted(point.step for point in client.get_metric_history(run_id, curve))
        assert steps == list(range(1, epochs + 1)), (curve, steps)


def check_complete_run(uri: str, run_id: str, epochs: int) -> None:
    """What a user checks in the UI for a finished run: params, curves, test metrics, artifacts, model."""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key in ("build.hidden_units", "build.embedding_dim", "fit.epochs", "fit.batch_size",
                "split.validation_size", "ingest.source", "fit.early_stopping.enabled", "seed"):
        assert key in params, key
    assert params["fit.epochs"] == str(epochs)
    assert_every_epoch_recorded(client, run_id, epochs)
    for metric in ("test_loss", "test_accuracy", "test_precision", "test_recall", "test_f1_score", "test_roc_auc"):
        assert metric in run.data.metrics, metric
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    for stage in ("ingest", "build", "fit", "evaluate"):
        assert float(run.data.tags[f"seconds.{stage}"]) >= 0.0
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "figures")} | {a.path for a in client.list_artifacts(run_id, "config")}
    for path in ("config/config.yaml", "model_summary.txt", "history.csv", "figures/loss.png",
                 "figures/accuracy.png", "figures/roc_curve.png", "figures/confusion_matrix.png"):
        assert path in artifacts, path
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest and '"num_rows"' in dataset.profile
    profile, params = json.loads(dataset.profile), run.data.params  # the source's train part: training and validation
    assert profile["source_train_rows"] == int(params["data.train_rows"]) + int(params["data.validation_rows"])
    info = mlflow.models.get_model_info(run.data.tags["model_uri"])
    assert "python_function" in info.flavors and info.signature is not None
    assert info.saved_input_example_info is not None  # a served model's example request, as the UI shows it
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    probabilities = model.predict(["A wonderful, moving film.", "Awful and boring."])
    assert len(probabilities) == 2 and all(0.0 <= p <= 1.0 for p in probabilities)


def environment(**extra: str) -> dict[str, str]:
    """The environment for a subprocess of the tests: no MLflow settings of the caller, this project importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # `mlflow run --env-manager local` runs `python` from PATH: the environment running these tests
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT)
    env.update(extra)
    return env


def output(process, limit: int = 3000) -> str:
    """What a finished subprocess printed, for an assertion's message: the end of stdout (where Hydra's
    job logging writes, errors included) and the end of stderr."""
    return f"--- stdout ---\n{(process.stdout or '')[-limit:]}\n--- stderr ---\n{(process.stderr or '')[-limit:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> list[float]:
    """One scoring request to a model server; the predictions it returns."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


def interrupt_when(process, ready: Callable[[], bool], every: float = 0.5, timeout: float = 300) -> tuple[str, str]:
    """Ctrl-C (SIGINT) to a running `process` as soon as ready() holds (at the latest after `timeout` seconds),
    as a user at its terminal would; then what it printed, (stdout, stderr). Killed if it has not ended 120 s
    later."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not ready():
            time.sleep(every)
            if process.poll() is not None:
                printed = process.communicate()
                raise AssertionError(f"ended before it was interrupted:\n{(printed[0] or '')[-3000:]}{(printed[1] or '')[-3000:]}")
        process.send_signal(signal.SIGINT)
        return process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
