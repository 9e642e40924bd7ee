"""Sweeps as a user runs them: multirun, `mlflow run -e`, parallel jobs, a failing job, an Optuna search."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT, tiny_overrides
from tests.helpers import created_store, environment, interrupt_when, output

pytestmark = pytest.mark.slow


def multirun(tmp_path: Path, archive: Path, *overrides: str, tracked: bool = True,
             new_store: bool = False) -> subprocess.CompletedProcess:
    """The tiny sweep over fit.epochs=2,3 and `overrides`; new_store: into a store it makes itself."""
    base = tiny_overrides(archive, tmp_path, made_store=tracked and not new_store)
    if not tracked:
        base = [o for o in base if not o.startswith("tracking.uri")]
    return subprocess.run([sys.executable, "-m", "pipeline", "-m", *base, *overrides, "fit.epochs=2,3",
                           f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)


def sweep_runs(uri: str) -> tuple[object, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("imdb-sentiment")
    every = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in every if r.data.tags.get("sweep.parent") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in every]
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(every) == 1 + len(children)  # nothing recorded outside the sweep
    return parents[0], children


def analysis_table(uri: str, parent_id: str, tmp_path: Path, name: str = "jobs.csv") -> pd.DataFrame:
    path = MlflowClient(uri).download_artifacts(parent_id, f"analysis/{name}", str(tmp_path / parent_id))
    return pd.read_csv(path)


def test_grid_sweep_gives_one_parent_a_child_per_job_and_the_analysis(tiny_archive, tmp_path):
    """The overfitting grid as the MLflow project's entry point runs it (`mlflow run . -e overfit_sweep`, its
    axes replaced by tiny ones, the early-stopped reference kept: recorded from the training of hidden_units=16, whose
    settings are its own), no experiment named, as the README writes it:
    every job in imdb-sentiment under a parent that carries the project's tags, to which the run `mlflow run`
    made in Default points. (`python -m pipeline -m` itself: every other sweep here.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path) if not o.startswith("tracking.uri")]
    overrides += ["build.hidden_units=4,16", "fit.epochs=2,3", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(PROJECT), "-e", "overfit_sweep", "--env-manager", "local",
         "-P", "overrides=" + " ".join(overrides)],
        cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, output(done)
    parent, children = sweep_runs(uri)
    assert parent.data.tags["mlflow.project.entryPoint"] == "overfit_sweep"  # the project's tags
    assert parent.info.status == "FINISHED"
    (pointer,) = MlflowClient(uri).search_runs(["0"])  # the run `mlflow run` made in Default, and ended
    assert pointer.data.tags["pipeline.recorded_as"] == parent.info.run_id and pointer.info.status == "FINISHED"
    assert parent.data.params["sweep.build.hidden_units"] == "4,16"
    assert parent.data.params["sweep.fit.epochs"] == "2,3"
    names = sorted(child.info.run_name for child in children)
    assert names == ["early_stopping,hidden_units=16,epochs=3", "hidden_units=16,epochs=2", "hidden_units=16,epochs=3",
                     "hidden_units=4,epochs=2", "hidden_units=4,epochs=3"]
    assert all(child.info.status == "FINISHED" for child in children)
    table = analysis_table(uri, parent.info.run_id, tmp_path)
    assert sorted(zip(table["build.hidden_units"], table["fit.epochs"])) == [(4, 2), (4, 3), (16, 2), (16, 3)]
    by_name = {c.info.run_name: c for c in children}
    for row in table.itertuples():
        child = by_name[row.job]
        assert row.test_accuracy == pytest.approx(child.data.metrics["test_accuracy"])
        assert row.min_val_loss == pytest.approx(child.data.metrics["best_val_loss"])
        assert 1 <= row.min_val_loss_epoch <= row.epochs_trained == int(child.data.params["fit.epochs"])
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "analysis")}
    assert {"analysis/report.md", "analysis/jobs.csv", "analysis/val_loss_by_build.hidden_units.png",
            "analysis/test_accuracy_by_fit.epochs.png"} <= artifacts
    report = Path(MlflowClient(uri).download_artifacts(parent.info.run_id, "analysis/report.md", str(tmp_path))).read_text()
    assert "Validation loss is lowest at epoch" in report and "Early stopping" in report
    assert parent.data.tags["sweep.best_run"] in {c.info.run_id for c in children}
    # a training per setting for both budgets (sweep.share_budgets); the data prepared once, at the sweep's start (its
    # axes change no data setting), and read from the stage cache by every job (and the early-stopping reference
    # from hidden_units=16's, not trained again: one training of it, 3 runs)
    shared = [{c.data.tags["pipeline.training"] for c in children if f"_units={u}," in c.info.run_name} for u in (4, 16)]
    assert len(shared[0] | shared[1]) == 2 and "4 budgets recorded from 2 trainings" in report
    assert "ingest, split, vectorize: in a worker process while the sweep starts" in done.stdout + done.stderr
    assert {c.data.tags["cache.ingest"] + c.data.tags["cache.vectorize"] for c in children} == {"hithit"}
    # every job's terminal is as calm as the first (Hydra sets up logging anew for each), each keeps its log
    assert done.stdout.count("ended FINISHED") == 5 and "[pipeline" not in done.stdout
    for child in children:
        kept = Path(MlflowClient(uri).download_artifacts(child.info.run_id, "logs/run.log", str(tmp_path / child.info.run_id)))
        text = kept.read_text()
        assert f"MLflow run {child.info.run_id} ({child.info.run_name})" in text
        # a budget's log: the training's lines until training reached it, then its own record's, no other budget's
        evaluated = [line for line in text.splitlines() if "][pipeline][INFO] - evaluate " in line]
        assert len(evaluated) == 1, (child.info.run_name, evaluated)
        last = int(child.data.metrics["epochs_trained"])
        assert f"last (epoch {last})" in evaluated[0] or f"one model (epoch {last})" in evaluated[0] or \
            child.info.run_name.startswith("early_stopping"), evaluated
        if child.info.run_name.endswith("epochs=2"):  # (the 3-epoch budget's run opened after training reached it)
            assert f"({child.info.run_name[:-1]}3)" not in text

    # the analysis runs again on its own for a finished sweep
    again = subprocess.run([sys.executable, "-m", "pipeline.sweep", parent.info.run_id, "--tracking-uri", uri],
                           cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, output(again)
    assert "Validation loss is lowest at epoch" in again.stdout


def test_a_sweep_over_learning_rate_and_dropout_is_analysed_along_those_axes(tiny_archive, tmp_path):
    """Neither hidden units nor epochs swept: the table, report and figures speak of what was."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "-m", *tiny_overrides(tiny_archive, tmp_path),
                           "build.learning_rate=0.001,0.01", "build.dropout_rate=0.0,0.5", "fit.epochs=3",
                           f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, output(done)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, children = sweep_runs(uri)
    table = analysis_table(uri, parent.info.run_id, tmp_path)
    assert sorted(zip(table["build.learning_rate"], table["build.dropout_rate"])) == [
        (0.001, 0.0), (0.001, 0.5), (0.01, 0.0), (0.01, 0.5)]
    assert "build.hidden_units" not in table and "hidden_units" not in table
    by_name = {c.info.run_name: c for c in children}
    for _, row in table.iterrows():  # each row is its child's own settings and outcome
        params = by_name[row["job"]].data.params
        assert float(params["build.learning_rate"]) == row["build.learning_rate"]
        assert float(params["build.dropout_rate"]) == row["build.dropout_rate"]
        assert row["epochs_trained"] == 3 and not row["pruned"]
    client = MlflowClient(uri)
    report = Path(client.download_artifacts(parent.info.run_id, "analysis/report.md", str(tmp_path))).read_text()
    assert "`build.learning_rate` x `build.dropout_rate`" in report
    assert "### `build.learning_rate` (0.001,0.01)" in report and "### `build.dropout_rate` (0.0,0.5)" in report
    assert "Validation loss is lowest at epoch" in report
    assert "hidden" not in report.lower() and "units" not in report.lower()
    artifacts = {a.path.removeprefix("analysis/") for a in client.list_artifacts(parent.info.run_id, "analysis")}
    assert {"val_loss_by_build.learning_rate.png", "val_loss_by_build.dropout_rate.png",
            "best_val_accuracy_by_build.learning_rate.png", "best_val_accuracy_by_build.dropout_rate.png"} <= artifacts
    best = {c.info.run_id: max(p.value for p in client.get_metric_history(c.info.run_id, "val_accuracy"))
            for c in children}
    assert best[parent.data.tags["sweep.best_run"]] == max(best.values())  # chosen by validation accuracy
    print(report)  # the report as a user reads it: shown with pytest -s


def test_a_failing_job_does_not_lose_the_others(tiny_archive, tmp_path):
    # 30 validation reviews is more than the tiny training split holds: those jobs fail in the split stage;
    # hidden_units=0 is an invalid setting: those jobs are failed children too, refused before any data is read
    done = multirun(tmp_path, tiny_archive, "split.validation_size=8,30", "build.hidden_units=4,0")
    assert done.returncode != 0  # the sweep reports that jobs failed ...
    assert "6 sweep job(s) failed" in done.stdout + done.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"  # ... after the others ran and were analysed
    names = {(size, units, epochs): f"validation_size={size},hidden_units={units},epochs={epochs}"
             for size in (8, 30) for units in (4, 0) for epochs in (2, 3)}
    status = {c.info.run_name: c.info.status for c in children}
    assert status == {name: "FINISHED" if (size, units) == (8, 4) else "FAILED"
                      for (size, units, _), name in names.items()}
    by_name = {c.info.run_name: c for c in children}
    for (size, units, _), name in names.items():
        if units == 0:
            assert "build.hidden_units=0 is not allowed" in by_name[name].data.tags["error"], name
        elif size == 30:
            assert "leaves no training data" in by_name[name].data.tags["error"], name
    assert len(analysis_table(uri, parent.info.run_id, tmp_path)) == 2
    listed = analysis_table(uri, parent.info.run_id, tmp_path, "failed_jobs.csv")
    assert sorted(listed.job) == sorted(name for name, state in status.items() if state == "FAILED")


def optuna_search(tmp_path: Path, archive: Path, *overrides: str) -> subprocess.CompletedProcess:
    """experiment=optuna_search on tiny data, with a median pruner that judges from the first finished trial
    and the first epoch: a learning rate of 0.03 or 0.00001 makes trials that differ at epoch 1."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "-m", "experiment=optuna_search", *tiny_overrides(archive, tmp_path),
         "fit.epochs=6", "build.learning_rate=choice(0.03, 0.00001)", "hydra.sweeper.pruners.median.n_startup_trials=1",
         "hydra.sweeper.pruners.median.n_warmup_steps=0", *overrides, f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)


def test_optuna_search_prunes_trials_and_resumes_its_study(tiny_archive, tmp_path):
    optuna = pytest.importorskip("optuna")
    first = optuna_search(tmp_path, tiny_archive, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, output(first)
    # the same command, asking the study for 5 trials: only the 2 it lacks run, under a new parent
    second = optuna_search(tmp_path, tiny_archive, "hydra.sweeper.n_trials=5")
    assert second.returncode == 0, output(second)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imdb-sentiment")
    every = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in every if r.data.tags.get("sweep.parent") == "true"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    assert "choice(8, 16, 32, 64)" in parents[0].data.params["sweep.build.hidden_units"]
    trials = {}
    for parent, expected in zip(parents, ({"0", "1", "2"}, {"3", "4"})):
        assert parent.data.tags["search.study"] == "imdb-sentiment"
        children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert {c.data.tags["search.trial"] for c in children} == expected  # no finished trial ran again
        trials.update({int(c.data.tags["search.trial"]): c for c in children})
    assert len(every) == 2 + 5
    assert parents[1].data.tags["search.trials_before"] == "3" and parents[1].data.tags["search.trials"] == "5"
    # every trial, pruned or not, trained, was evaluated and ended FINISHED; a pruned one trained fewer epochs
    assert all(c.info.status == "FINISHED" and "test_accuracy" in c.data.metrics for c in trials.values())
    pruned = {n for n, c in trials.items() if c.data.tags["search.pruned"] == "true"}
    assert pruned and pruned != set(trials)
    for number, child in trials.items():
        epochs = child.data.metrics["epochs_trained"]
        assert (epochs < 6) if number in pruned else (epochs == 6), (number, epochs)
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) == epochs
        assert child.data.params["build.learning_rate"] in {"0.03", "1e-05"}
    # the study, read back as a user would with Optuna, agrees: 5 trials, the pruned ones PRUNED
    study = optuna.load_study(study_name="imdb-sentiment", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {n: "PRUNED" if n in pruned else "COMPLETE" for n in range(5)}
    best = max(max(p.value for p in client.get_metric_history(c.info.run_id, "val_accuracy"))
               for n, c in trials.items() if n not in pruned)
    assert study.best_value == pytest.approx(best)  # the objective is the job's best validation accuracy


def test_an_optuna_search_interrupted_mid_trial_resumes_with_the_printed_command_and_exits_0(tiny_archive, tmp_path):
    """Ctrl-C while a trial trains, then the line the search printed: its trials finish under the same parent,
    the interrupted one is said as interrupted (not failed), and the command exits 0."""
    pytest.importorskip("optuna")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "pipeline", "-m", "experiment=optuna_search", *tiny_overrides(tiny_archive, tmp_path),
            "fit.epochs=300", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=none",
            f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    client = created_store(uri)  # (made before the search starts: two processes must not create one store at once)
    process = subprocess.Popen(args, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def trained_a_few_epochs() -> bool:  # the first trial has trained a few of its 300 epochs
        experiment = client.get_experiment_by_name("imdb-sentiment")
        running = experiment and client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING' "
                                                    "and tags.`search.trial` = '0'")
        return bool(running) and len(client.get_metric_history(running[0].info.run_id, "val_loss")) >= 3

    printed, _ = interrupt_when(process, trained_a_few_epochs, every=0.3)
    assert process.returncode == 130, printed[-3000:]
    said = [line for line in printed.splitlines() if "resume it with: " in line]
    assert len(said) == 1, printed[-3000:]
    resumed = subprocess.run(shlex.split(said[0].split("resume it with: ", 1)[1]), cwd=tmp_path, env=environment(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, output(resumed)
    assert "1 interrupted earlier and not run again" in resumed.stdout + resumed.stderr, output(resumed)
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FINISHED", "FINISHED", "KILLED"], statuses  # the trials asked, and the one interrupted
    report = MlflowClient(uri).download_artifacts(parent.info.run_id, "analysis/report.md", str(tmp_path))
    text = Path(report).read_text()
    assert "## Interrupted jobs" in text and "## Failed jobs" not in text
    assert parent.data.metrics.get("jobs_failed", 0) == 0


@pytest.mark.xdist_group("ray")  # with test_cluster.py: it counts the machine's Ray processes
def test_ray_launcher_runs_the_sweep_on_a_local_ray_instance(tiny_archive, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    before = ray_processes()
    # The launcher starts a local Ray instance for the sweep (2 CPUs) and stops it when the sweep ends.
    done = multirun(tmp_path, tiny_archive, "build.hidden_units=4,8", "hydra/launcher=ray",
                    "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false",
                    "sweep.threads=1")
    assert done.returncode == 0, output(done)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, children = sweep_runs(uri)
    assert sorted(c.info.run_name for c in children) == [
        "hidden_units=4,epochs=2", "hidden_units=4,epochs=3", "hidden_units=8,epochs=2", "hidden_units=8,epochs=3"]
    assert all(c.info.status == "FINISHED" for c in children) and len({c.data.tags["pipeline.training"] for c in children}) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len(analysis_table(uri, parent.info.run_id, tmp_path)) == 4
    # every job ran in a Ray worker process, not in the process that started the sweep
    assert "(_run_job pid=" in done.stdout + done.stderr
    assert ray_processes() <= before  # the Ray instance the sweep started is gone (others may have ended meanwhile)


def ray_processes() -> set[str]:
    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return set(found.stdout.split())


def test_model_comparison_ranks_the_families_by_validation_accuracy(tiny_archive, tmp_path):
    """Every family at three seeds under one parent; the ranking, figures and report on the parent; the
    best family is the one of the highest mean validation accuracy, and the champion alias follows it."""
    base = tiny_overrides(tiny_archive, tmp_path)
    done = subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=model_comparison", *base,
                           "evaluate.registered_model_name=imdb-tiny", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, output(done)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, children = sweep_runs(uri)
    assert sorted((c.data.params["build.family"], c.data.params["seed"]) for c in children) == sorted(
        (family, seed) for family in ("tutorial", "fasttext", "cnn", "nbsvm") for seed in "123")
    assert all(c.info.status == "FINISHED" for c in children)
    ranking = analysis_table(uri, parent.info.run_id, tmp_path, "ranking.csv")
    # read back from the children, as a user would: each family's mean best validation accuracy
    client = MlflowClient(uri)
    by_family: dict[str, list[float]] = {}
    for child in children:
        best = max(p.value for p in client.get_metric_history(child.info.run_id, "val_accuracy"))
        by_family.setdefault(child.data.params["build.family"], []).append(best)
    means = {family: sum(values) / len(values) for family, values in by_family.items()}
    assert ranking["best_val_accuracy"].tolist() == pytest.approx(sorted(means.values(), reverse=True))
    chosen = ranking["family"][0]
    assert means[chosen] == max(means.values()) and parent.data.tags["sweep.best_family"] == chosen
    tests = [c.data.metrics["test_accuracy"] for c in children if c.data.params["build.family"] == chosen]
    assert ranking["test_accuracy_mean"][0] == pytest.approx(sum(tests) / 3)
    assert set(ranking.columns) >= {"test_accuracy_std", "min_val_loss_epoch", "fit_seconds", "parameters",
                                    "model_size_mb"}
    assert (ranking["parameters"] > 0).all() and (ranking["model_size_mb"] > 0).all()
    best_run = client.get_run(parent.data.tags["sweep.best_run"])
    assert best_run.data.params["build.family"] == chosen
    assert client.get_model_version_by_alias("imdb-tiny", "champion").run_id == best_run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")}
    assert {"analysis/test_accuracy_by_training_seconds.png", "analysis/val_loss_by_family.png",
            "analysis/report.md"} <= artifacts
    report = Path(client.download_artifacts(parent.info.run_id, "analysis/report.md", str(tmp_path))).read_text()
    assert f"**Best family: {chosen}**" in report and "Overfitting, family by family" in report
    assert all(f"- **{family}**: validation loss is lowest at epoch" in report for family in means)
    # one split for every job (split.seed): each encoding was prepared once, by its first job (tutorial and
    # cnn encode the same tokens under the tiny overrides; fasttext and nbsvm their own n-grams)
    assert sum(c.data.tags["cache.vectorize"] == "miss" for c in children) == 3
