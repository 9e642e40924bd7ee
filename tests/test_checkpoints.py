"""A run's checkpoints, read back as a user would: LoggedModels of the run with their names, steps, tags,
linked metrics (each its own epoch's, as the Models tab shows them), the served and registered one, test
accuracies recomputed from the loaded models, and a model left half-logged by a killed process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import ingest, split, tracking
from pipeline.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import CURVES, assert_every_epoch_recorded, runs


def checkpoints(uri: str, run_id: str) -> dict[str, object]:
    """The run's LoggedModels by their `checkpoint` tag (intermediate ones as epoch-N), each with its step."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    steps = {output.model_id: output.step for output in run.outputs.model_outputs}
    found = {}
    for model in mlflow.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                             output_format="list"):
        role = model.tags["checkpoint"]
        found[role if role != "epoch" else f"epoch-{steps[model.model_id]}"] = (model, steps[model.model_id])
    return found


def linked(model, key: str) -> dict[int, float]:
    points = [(metric.step, metric.value) for metric in model.metrics if metric.key == key]
    assert len(points) <= 1, (model.name, key, points)  # one value per column: the Models tab shows one
    return dict(points)


def at_epoch(history, epoch: int, curve: str) -> dict[int, float]:
    """What the model of `epoch` has for `curve`: that epoch's value alone."""
    return {epoch: float(history.loc[history["epoch"] == epoch, curve].iloc[0])}


def served_accuracy(cfg, model_id: str) -> float:
    """Test accuracy of the logged model, loaded and served the raw test reviews."""
    test = split.split(ingest.ingest(cfg.ingest, cfg.seed).frame, cfg.split, cfg.seed).test
    predicted = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(test[["text"]])
    return float(np.mean((np.asarray(predicted) > 0.5) == test["label"].to_numpy()))


def test_a_run_logs_its_best_and_last_epoch_and_serves_the_best(tiny_archive, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["fit.epochs=6", "evaluate.registered_model_name=imdb"])
    metrics, objects = train(cfg)
    history = objects["fitted"].history
    best_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert best_epoch != 6, "the tiny data must overfit for this test to see two models"
    run = runs(cfg.tracking.uri).iloc[0]
    client = MlflowClient(cfg.tracking.uri)
    assert_every_epoch_recorded(client, run.run_id, 6)  # the run's curves: one point an epoch, no copies
    found = checkpoints(cfg.tracking.uri, run.run_id)
    assert set(found) == {"best", "last"}
    (best, best_step), (last, last_step) = found["best"], found["last"]
    assert (best_step, last_step) == (best_epoch, 6)
    for model, step in ((best, best_step), (last, last_step)):  # each model's columns: its own epoch's values
        for curve in CURVES:
            assert linked(model, curve) == pytest.approx(at_epoch(history, step, curve))
        assert linked(model, "test_accuracy")[0] == pytest.approx(served_accuracy(cfg, model.model_id))
    assert linked(last, "loss") != linked(best, "loss")
    assert run["metrics.best.test_accuracy"] == pytest.approx(linked(best, "test_accuracy")[0])
    assert run["metrics.last.test_accuracy"] == pytest.approx(linked(last, "test_accuracy")[0])
    assert run["metrics.test_accuracy"] == metrics["test_accuracy"] == pytest.approx(run["metrics.best.test_accuracy"])
    assert run["tags.model_uri"] == f"models:/{best.model_id}"
    name = run["tags.mlflow.runName"]  # a row of the Models tab says whose, which and whether served
    assert (best.name, last.name) == (f"best-epoch-{best_step}-served of {name}", f"last-epoch-6 of {name}")
    version = client.get_model_version("imdb", "1")
    assert version.source == f"models:/{best.model_id}" and version.run_id == run.run_id
    ranked = mlflow.search_logged_models([run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'",
                                         output_format="list",
                                         order_by=[{"field_name": "metrics.val_loss", "ascending": True}])
    assert ranked[0].model_id == best.model_id  # ranked by validation, as the Models tab sorts them


def test_serving_the_last_epoch_and_intermediate_checkpoints(tiny_archive, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["fit.epochs=6", "fit.checkpoint_every=2",
                                                                     "evaluate.serve=last", "tracking.run_name='lr=0.01/a'"])
    metrics, objects = train(cfg)
    history = objects["fitted"].history
    best_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    run = runs(cfg.tracking.uri).iloc[0]
    found = checkpoints(cfg.tracking.uri, run.run_id)
    every = {f"epoch-{epoch}" for epoch in (2, 4) if epoch != best_epoch}
    assert set(found) == {"best", "last"} | every
    last, _ = found["last"]
    assert run["tags.model_uri"] == f"models:/{last.model_id}" and last.name == "last-epoch-6-served of lr=0_01_a"
    assert metrics["test_accuracy"] == pytest.approx(served_accuracy(cfg, last.model_id))
    for name in every:
        model, step = found[name]
        assert linked(model, "val_loss") == pytest.approx(at_epoch(history, step, "val_loss"))
        assert model.name == f"{name} of lr=0_01_a"
    loaded = mlflow.pyfunc.load_model(f"models:/{found[sorted(every)[0]][0].model_id}")  # serves raw text too
    assert loaded.predict(["A wonderful film.", "Awful."]).shape == (2,)
    for model, _ in found.values():  # each one complete, its MLmodel naming itself
        assert str(model.status) in ("READY", "LoggedModelStatus.READY")
        assert mlflow.models.get_model_info(f"models:/{model.model_id}").model_uuid == model.model_id


def test_with_early_stopping_best_and_last_are_one_model(tiny_archive, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["fit=early_stopping", "fit.epochs=6",
                                                                     "fit.early_stopping.patience=1"])
    train(cfg)
    run = runs(cfg.tracking.uri).iloc[0]
    found = checkpoints(cfg.tracking.uri, run.run_id)
    assert set(found) == {"best,last"}
    model, step = found["best,last"]
    assert step == run["metrics.best_epoch"] == run["metrics.best.epoch"] == run["metrics.last.epoch"]
    assert run["metrics.best.test_accuracy"] == run["metrics.last.test_accuracy"] == run["metrics.test_accuracy"]
    assert run["tags.model_uri"] == f"models:/{model.model_id}"
    assert model.name == f"best+last-epoch-{step}-served of {run['tags.mlflow.runName']}"
    a_model_half_logged_when_the_process_is_killed_ends_failed_and_the_run_says_so(cfg.tracking.uri)


def a_model_half_logged_when_the_process_is_killed_ends_failed_and_the_run_says_so(uri: str):
    """The run's watchdog (pipeline/tracking/watchdog.py, as TrackedRun starts it) when its process is killed
    outright while logging a checkpoint: its input closes with the LoggedModel still PENDING. That model ends
    FAILED with an `error` tag, the run KILLED with an error naming it; the model logged before stays READY.
    (In the store of the test above, a run of its own: a new store would cost seconds of migrations.)"""
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("imdb-sentiment").experiment_id
    run_id = client.create_run(experiment, run_name="tiny").info.run_id
    done = client.create_logged_model(experiment, name="best-epoch-2-served of tiny", source_run_id=run_id)
    client.finalize_logged_model(done.model_id, LoggedModelStatus.READY)
    half = client.create_logged_model(experiment, name="last-epoch-3 of tiny", source_run_id=run_id)
    watchdog = subprocess.Popen([sys.executable, str(Path(tracking.__file__).with_name("watchdog.py")), uri, run_id],
                                stdin=subprocess.PIPE)
    watchdog.communicate(json.dumps({"time": int(time.time() * 1000), "step": 3, "values": {"val_loss": 0.5}}).encode()
                         + b"\n", timeout=120)  # then its input closes without "ended": the process is gone
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "while it logged the model last-epoch-3 of tiny (marked FAILED)" in run.data.tags["error"]
    assert client.get_logged_model(half.model_id).status == LoggedModelStatus.FAILED
    assert "ended while this model was logged" in client.get_logged_model(half.model_id).tags["error"]
    assert client.get_logged_model(done.model_id).status == LoggedModelStatus.READY
    assert [point.step for point in client.get_metric_history(run_id, "val_loss")] == [3]
