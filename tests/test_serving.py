"""The model in use and a team's tracking server: registry, REST serving, batch scoring, concurrent writers."""

from __future__ import annotations

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
from tests.helpers import assert_every_epoch_recorded, environment, free_port, output, post, runs
from tests.servers import SERVER_ENV, model_server, postgresql, running, server_command, tracking_server

REVIEWS = ["Superb, brilliant and moving.", "Awful, boring, the worst.", "A film, with a plot."]


@pytest.fixture(scope="module")
def registered(tiny_archive, tmp_path_factory):
    """Two tiny runs, each registering its model under one name (trained once for the cases below)."""
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path_factory.mktemp("registered"))
                         + ["evaluate.registered_model_name=imdb-tiny"])
    train(cfg)
    train(cfg)
    return cfg


@pytest.mark.xdist_group("registered")  # (one worker trains the module's two runs once)
def test_evaluate_registers_the_model_under_its_name(registered):
    cfg = registered
    client = MlflowClient(cfg.tracking.uri)
    versions = sorted(client.search_model_versions("name = 'imdb-tiny'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    assert {v.run_id for v in versions} == set(runs(cfg.tracking.uri).run_id)
    model = mlflow.pyfunc.load_model("models:/imdb-tiny/2")
    assert model.predict(REVIEWS).shape == (3,)


@pytest.fixture(scope="module")
def served(registered):
    """The last run's logged model, loaded as a user loads it."""
    return mlflow.pyfunc.load_model(runs(registered.tracking.uri)["tags.model_uri"].iloc[-1])


@pytest.mark.xdist_group("registered")
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


@pytest.mark.xdist_group("registered")
def test_the_loaded_model_reads_the_review_by_name(served):
    """A table's column `text` is the review, whatever other columns come before or after it (MLflow alone hands
    the model a table's first column); a single column is the reviews whatever its name; a table of several
    columns without `text` is refused, naming the columns it has."""
    model, alone = served, served.predict(REVIEWS)
    ids, decoy = list(range(len(REVIEWS))), ["zzz"] * len(REVIEWS)
    for table in (pd.DataFrame({"extra": decoy, "text": REVIEWS}), pd.DataFrame({"id": ids, "text": REVIEWS, "note": decoy}),
                  [{"id": i, "text": text} for i, text in zip(ids, REVIEWS)], pd.DataFrame({"review": REVIEWS})):
        assert model.predict(table) == pytest.approx(alone)
    assert model.predict({"stars": 5, "text": REVIEWS[0]}) == pytest.approx(alone[:1])
    for table in (pd.DataFrame({"id": ids, "review": REVIEWS}), [{"review": REVIEWS[0], "stars": 5}]):
        columns = ", ".join(map(repr, table.columns if isinstance(table, pd.DataFrame) else table[0]))
        with pytest.raises(mlflow.exceptions.MlflowException, match=re.escape(f"no column `text` among the 2 columns "
                                                                              f"sent ({columns}): name the review's column `text`")):
            model.predict(table)


def team_sweep(overrides: list[str], folder, server: str, epochs: str, **env: str) -> subprocess.Popen:
    """The README's team recipe: a sweep of 4 jobs, 2 writing at once, each registering its model. What it
    prints goes to `sweep.out` in `folder` (a pipe nobody reads while it runs could fill and stop it)."""
    with open(folder / "sweep.out", "w") as printed:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "-m", *overrides, "build.hidden_units=4,8", f"fit.epochs={epochs}",
             "build.learning_rate=0.02", "evaluate.registered_model_name=imdb-tiny", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", "sweep.threads=1", f"hydra.sweep.dir={folder / 'multirun'}",
             "tracking.wait_for_server=180"],  # a server restarted on a loaded machine may take a while to answer
            cwd=folder, env=environment(MLFLOW_TRACKING_URI=server, **env), stdout=printed, stderr=subprocess.STDOUT)


def finished(sweep: subprocess.Popen, folder) -> None:
    try:
        sweep.wait(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, (folder / "sweep.out").read_text()[-5000:]


def check_team_sweep(server: str, folder) -> None:
    """Every run, metric point and artifact of the sweep arrived at the server, written by two jobs at once; the
    registry's champion alias points at the best job's best checkpoint."""
    assert not (folder / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("imdb-sentiment")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served by the server
    every = client.search_runs([experiment.experiment_id])
    parent = next(r for r in every if r.data.tags.get("sweep.parent") == "true")
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(every) == 5 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in every), [(r.info.run_name, r.info.status) for r in every]
    for child in children:
        assert child.data.tags.get("pipeline.complete") == "true"
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


def until_a_job_writes_epochs(server: str, sweep: subprocess.Popen) -> None:
    """Waits until a job of the sweep is training and writing its epochs to the server."""
    client = MlflowClient(server)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert sweep.poll() is None, "the sweep ended before any job wrote an epoch"
        experiment = client.get_experiment_by_name("imdb-sentiment")
        running_children = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "RUNNING"
                            and "mlflow.parentRunId" in r.data.tags] if experiment else []
        if running_children and client.get_metric_history(running_children[0].info.run_id, "val_loss"):
            return
        time.sleep(0.5)
    sweep.kill()
    pytest.fail("no job started writing epochs")


@pytest.mark.slow
def test_a_team_server_on_sqlite_restarted_mid_sweep_keeps_every_child_and_serves_the_champion(tiny_archive, tmp_path):
    """The README's team recipe: `mlflow server` keeping runs in SQLite and serving artifacts itself; a sweep
    of 4 jobs, 2 writing at once, registering models. The server is stopped while a job is writing its epochs
    and started again 5 s later on the same store: every child ends FINISHED with all its epochs, none stays
    RUNNING, and the sweep succeeds (a job's writes are kept while the server is away and written when it
    answers: pipeline/tracking/journal.py). Then the champion is served over REST and scores batches from the command line.
    (PostgreSQL and a server behind basic-auth: the test below.)"""
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    args = server_command(tmp_path, port)
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path, made_store=False) if not o.startswith("tracking.uri")]
    with running(args, tmp_path, f"{server}/health", **SERVER_ENV):
        # 40 and 60 epochs: a job is still writing its epochs when the server goes down
        sweep = team_sweep(overrides, tmp_path, server, "40,60")
        until_a_job_writes_epochs(server, sweep)
    time.sleep(5)  # the server is down: the jobs' requests fail and are retried
    with running(args, tmp_path, f"{server}/health", **SERVER_ENV):
        finished(sweep, tmp_path)
        check_team_sweep(server, tmp_path)

        # served from the registry by alias, answering real requests
        with model_server("models:/imdb-tiny@champion", tmp_path, server) as url:
            served = post(url, {"inputs": REVIEWS})
            by_name = post(url, {"dataframe_records": [{"id": 7, "text": text, "note": "zzz"} for text in REVIEWS]})
        assert len(served) == 3 and served[0] > served[1]
        assert by_name == pytest.approx(served)  # the column `text`, not the first one

        # batch scoring from the command line, a CSV (a column before and two after the text, one of them the true
        # labels, kept beside the predicted ones) and a text file
        pd.DataFrame({"id": [1, 2, 3], "text": REVIEWS, "note": ["zzz"] * 3, "label": ["pos", "neg", "neg"]}).to_csv(
            tmp_path / "reviews.csv", index=False)
        (tmp_path / "reviews.txt").write_text("\n".join(REVIEWS) + "\n")
        for source in ("reviews.csv", "reviews.txt"):
            done = subprocess.run([sys.executable, "-m", "pipeline.score", "models:/imdb-tiny@champion", source,
                                   "-o", f"{source}.scored.csv"], cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, output(done)
            positive = sum(p > 0.5 for p in served)
            assert (f"scored 3 reviews of {source} with models:/imdb-tiny@champion: {positive} positive, {3 - positive} "
                    "negative") in done.stderr, output(done)
            assert done.stderr.rstrip().endswith(f"written to {source}.scored.csv"), output(done)
            scored = pd.read_csv(tmp_path / f"{source}.scored.csv")
            predicted = "predicted_" if source == "reviews.csv" else ""  # (the file's own `label` is kept)
            assert scored["text"].tolist() == REVIEWS
            assert scored["probability"].tolist() == pytest.approx(served, abs=1e-6)
            assert scored[f"{predicted}label"].tolist() == ["positive" if p > 0.5 else "negative" for p in served]
            if predicted:
                assert scored.columns.tolist() == ["id", "text", "note", "label", "probability", "predicted_label"]
                assert scored["label"].tolist() == ["pos", "neg", "neg"]


@pytest.mark.slow
def test_a_team_server_on_postgresql_behind_basic_auth_records_a_signed_sweep_and_refuses_the_unsigned(
        tiny_archive, tmp_path, monkeypatch):
    """The same recipe with the runs in PostgreSQL, behind MLflow's basic-auth: a sweep given credentials is
    recorded whole (the jobs get them from the driver); a run without credentials, or with wrong ones, fails in
    seconds naming what to set, and leaves nothing on the server."""
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path, made_store=False) if not o.startswith("tracking.uri")]
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "a-long-test-password-1"}
    with postgresql() as database, tracking_server(
            tmp_path, database, "basic-auth", MLFLOW_AUTH_ADMIN_PASSWORD=admin["MLFLOW_TRACKING_PASSWORD"],
            MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret") as server:
        finished(team_sweep(overrides, tmp_path, server, "8,12", **admin), tmp_path)

        command = [sys.executable, "-m", "pipeline", *overrides, "fit.epochs=2", f"hydra.run.dir={tmp_path / 'out'}"]
        started = time.monotonic()
        anonymous = subprocess.run(command, cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=server),
                                   capture_output=True, text=True, timeout=600)
        assert anonymous.returncode != 0 and time.monotonic() - started < 60
        said = anonymous.stdout + anonymous.stderr
        assert "refuses requests without credentials" in said and "MLFLOW_TRACKING_PASSWORD" in said
        wrong = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment(
            MLFLOW_TRACKING_URI=server, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="wrong"))
        assert wrong.returncode != 0 and "refuses these credentials" in wrong.stdout + wrong.stderr

        for key, value in admin.items():  # this process reads the server as the admin
            monkeypatch.setenv(key, value)
        check_team_sweep(server, tmp_path)  # the signed sweep, complete
        # nothing of the refused runs: the sweep's parent and 4 children are all the server holds
        client = MlflowClient(server)
        assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 5
