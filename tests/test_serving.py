"""The model in use and a team's tracking server: registry, REST serving, batch scoring, concurrent writers."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.train import train
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import assert_every_epoch_recorded, environment, output, post, runs
from tests.servers import model_server, postgresql, tracking_server

REVIEWS = ["Superb, brilliant and moving.", "Awful, boring, the worst.", "A film, with a plot."]


def test_evaluate_registers_the_model_under_its_name(tiny_archive, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["evaluate.registered_model_name=imdb-tiny"])
    train(cfg)
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    versions = sorted(client.search_model_versions("name = 'imdb-tiny'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    assert {v.run_id for v in versions} == set(runs(cfg.tracking.uri).run_id)
    model = mlflow.pyfunc.load_model("models:/imdb-tiny/2")
    assert model.predict(REVIEWS).shape == (3,)


@pytest.fixture(scope="module")
def served(tiny_archive, tmp_path_factory):
    """One tiny run's logged model, loaded as a user loads it (trained once for the cases below)."""
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path_factory.mktemp("served")))
    train(cfg)
    return mlflow.pyfunc.load_model(runs(cfg.tracking.uri)["tags.model_uri"][0])


@pytest.mark.parametrize("given, refusal", [
    (["A film.", None], "input 1 (counting from 0) is null, not a review"),
    ([123], "input 0 (counting from 0) is int 123, not a review"),
    (pd.DataFrame({"text": ["A film.", 4.5]}), "input 1 (counting from 0) is float 4.5, not a review"),
    (["A film.", ["a", "list"]], "input 1 (counting from 0) is list ['a', 'list'], not a review"),
    ([{"stars": 5}], "input 0 (counting from 0) is int 5, not a review"),
    (["A film.", "  "], "input 1 (counting from 0) is an empty string, not a review"),
])
def test_the_loaded_model_refuses_what_is_not_a_review(served, given, refusal):
    """In-process as over REST (tests/test_entrypoints.py): the message names the first bad input."""
    model = served
    with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(refusal)):
        model.predict(given)
    assert model.predict(["A film.", {"text": "Awful."}["text"]]).shape == (2,)  # text is still scored


@contextlib.contextmanager
def store(kind: str):
    """The team server's run store: SQLite (None: the server's default file) or a PostgreSQL cluster."""
    if kind == "postgresql":
        with postgresql() as uri:
            yield uri
    else:
        yield None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_team_server_parallel_sweep_champion_serving_and_batch_scoring(tiny_archive, tmp_path, backend):
    """The README's team recipe: `mlflow server` keeping runs in SQLite or PostgreSQL and serving artifacts
    itself; a sweep of 4 jobs, 2 writing at once, registering models; the champion served over REST."""
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path) if not o.startswith("tracking.uri")]
    with store(backend) as database, tracking_server(tmp_path, database) as server:
        sweep = subprocess.run(
            [sys.executable, "-m", "pipeline", "-m", *overrides, "build.hidden_units=4,8", "fit.epochs=8,12",
             "build.learning_rate=0.02", "evaluate.registered_model_name=imdb-tiny", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", "sweep.threads=1", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
            cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server), capture_output=True, text=True, timeout=900)
        assert sweep.returncode == 0, output(sweep)
        assert not (tmp_path / "mlflow.db").exists()  # everything went to the server

        # every run, metric point and artifact arrived, written by two jobs at once
        client = MlflowClient(server)
        experiment = client.get_experiment_by_name("imdb-sentiment")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served by the server
        every = client.search_runs([experiment.experiment_id])
        parent = next(r for r in every if r.data.tags.get("sweep.parent") == "true")
        children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(every) == 5 and len(children) == 4
        for child in children:
            assert_every_epoch_recorded(client, child.info.run_id, int(child.data.params["fit.epochs"]))
            paths = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
            assert {"figures/loss.png", "figures/accuracy.png"} <= paths
            assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["imdb-reviews"]
        assert {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")} >= {"analysis/report.md"}

        # the sweep pointed the registry's champion alias at its best job
        champion = client.get_model_version_by_alias("imdb-tiny", "champion")
        assert champion.run_id == parent.data.tags["sweep.best_run"]
        assert len(client.search_model_versions("name = 'imdb-tiny'")) == 4  # each job registers one checkpoint
        # ... at that job's best checkpoint by validation loss: its LoggedModel tagged best, at that epoch
        best_run = client.get_run(champion.run_id)
        assert champion.source == best_run.data.tags["model_uri"]
        checkpoint = client.get_logged_model(champion.source.removeprefix("models:/"))
        assert checkpoint.tags["checkpoint"] in ("best", "best,last")
        curve = client.get_metric_history(champion.run_id, "val_loss")
        lowest = min(curve, key=lambda point: (point.value, point.step))
        assert [o.step for o in best_run.outputs.model_outputs if o.model_id == checkpoint.model_id] == [lowest.step]

        # served from the registry by alias, answering real requests
        with model_server("models:/imdb-tiny@champion", tmp_path, server) as url:
            served = post(url, {"inputs": REVIEWS})
        assert len(served) == 3 and served[0] > served[1]

        # batch scoring from the command line, a CSV and a text file of reviews
        pd.DataFrame({"id": [1, 2, 3], "text": REVIEWS}).to_csv(tmp_path / "reviews.csv", index=False)
        (tmp_path / "reviews.txt").write_text("\n".join(REVIEWS) + "\n")
        for source in ("reviews.csv", "reviews.txt"):
            done = subprocess.run([sys.executable, "-m", "pipeline.score", "models:/imdb-tiny@champion", source,
                                   "-o", f"{source}.scored.csv"], cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, output(done)
            scored = pd.read_csv(tmp_path / f"{source}.scored.csv")
            assert scored["text"].tolist() == REVIEWS
            assert scored["probability"].tolist() == pytest.approx(served, abs=1e-6)
            assert scored["label"].tolist() == ["positive" if p > 0.5 else "negative" for p in served]


@pytest.mark.slow
def test_a_server_behind_basic_auth_records_a_run_with_credentials_and_refuses_one_without(tiny_archive, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path) if not o.startswith("tracking.uri")]
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "a-long-test-password-1"}
    with tracking_server(tmp_path, None, "basic-auth", MLFLOW_AUTH_ADMIN_PASSWORD=admin["MLFLOW_TRACKING_PASSWORD"],
                         MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret") as server:
        command = [sys.executable, "-m", "pipeline", *overrides, "fit.epochs=2", f"hydra.run.dir={tmp_path / 'out'}"]
        signed = subprocess.run(command, cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server, **admin),
                                capture_output=True, text=True, timeout=600)
        assert signed.returncode == 0, output(signed)
        started = time.monotonic()
        anonymous = subprocess.run(command, cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server),
                                   capture_output=True, text=True, timeout=600)
        assert anonymous.returncode != 0 and time.monotonic() - started < 60
        said = anonymous.stdout + anonymous.stderr
        assert "refuses requests without credentials" in said and "MLFLOW_TRACKING_PASSWORD" in said
        wrong = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment(
            MLFLOW_TRACKING_URI=server, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="wrong"))
        assert wrong.returncode != 0 and "refuses these credentials" in wrong.stdout + wrong.stderr
        # the server holds the one signed run, complete; nothing of the refused ones
        os.environ.update(admin)
        try:
            client = MlflowClient(server)
            every = client.search_runs([e.experiment_id for e in client.search_experiments()])
            assert [(r.info.status, r.data.tags.get("pipeline.complete")) for r in every] == [("FINISHED", "true")]
            assert len(client.get_metric_history(every[0].info.run_id, "val_loss")) == 2
        finally:
            for key in admin:
                os.environ.pop(key)


@pytest.mark.slow
def test_a_team_server_restarted_mid_sweep_leaves_every_finished_child_intact(tiny_archive, tmp_path):
    """The server is stopped while a job is writing its epochs and started again 5 s later on the same
    store: every child ends FINISHED with all its epochs, none stays RUNNING, and the sweep succeeds
    (MLflow's client retries refused requests with backoff, about two minutes by default)."""
    from tests.helpers import free_port
    from tests.servers import running

    port = free_port()
    server = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "2"]
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path) if not o.startswith("tracking.uri")]
    with running(args, tmp_path, f"{server}/health"):
        sweep = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-m", *overrides, "build.hidden_units=4,8", "fit.epochs=40,60",
             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep.threads=1",
             f"hydra.sweep.dir={tmp_path / 'multirun'}"],
            cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        client = MlflowClient(server)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until a job is training and writing its epochs
            experiment = client.get_experiment_by_name("imdb-sentiment")
            running_children = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "RUNNING"
                                and "mlflow.parentRunId" in r.data.tags] if experiment else []
            if running_children and client.get_metric_history(running_children[0].info.run_id, "val_loss"):
                break
            time.sleep(0.5)
        else:
            sweep.kill()
            pytest.fail("no job started writing epochs")
    time.sleep(5)  # the server is down: the jobs' requests fail and are retried
    with running(args, tmp_path, f"{server}/health"):
        printed, _ = sweep.communicate(timeout=900)
        assert sweep.returncode == 0, printed[-5000:]
        experiment = client.get_experiment_by_name("imdb-sentiment")
        every = client.search_runs([experiment.experiment_id])
        children = [r for r in every if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 4 and all(r.info.status == "FINISHED" for r in every), \
            [(r.info.run_name, r.info.status) for r in every]
        for child in children:
            assert_every_epoch_recorded(client, child.info.run_id, int(child.data.params["fit.epochs"]))
