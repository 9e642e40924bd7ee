"""A sweep's fit.epochs budgets recorded from one training (pipeline/budgets.py, pipeline/tracking/budgets.py):
which jobs share, and a budget's record equal to a training of that budget alone. (Sweeps run with sharing on by
default: tests/test_sweeps.py, test_resume.py and test_reliability.py run it on every launcher.)"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from pipeline import budgets, config
from pipeline.config import CONF
from tests.conftest import PROJECT, tiny_overrides
from tests.helpers import CURVES

GRID = [[f"build.hidden_units={units}", f"fit.epochs={epochs}"] for units in (4, 8) for epochs in (3, 1, 2)]


def planned(tiny_archive, tmp_path, *settings: str, grid=GRID, reference: list[str] | None = None,
            finished=lambda settings, job: False) -> list[list[str]]:
    """The plan of `grid`; `reference`: the overrides of the sweep's own settings, whose early-stopping job it asks;
    `finished`: which jobs a resume finds finished."""
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # (once: each compose then takes ms)
        def load(job):
            return compose(config_name="config", overrides=[*tiny_overrides(tiny_archive, tmp_path), *settings, *job])

        # (as BudgetSweeper composes: a group's first job by Hydra, the others from it with fit.epochs set)
        return budgets.plan(grid, budgets.composer(load),
                            reference and budgets.reference_of(config.load(load(reference))), finished)


def test_jobs_that_differ_only_in_their_budget_share_one_training_unless_something_reads_the_budget(
        tiny_archive, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.budgets")
    shared = planned(tiny_archive, tmp_path)
    assert shared == [[f"build.hidden_units={units}", "fit.epochs=3", f"+hydra.job.env_set.{budgets.BUDGETS}='1,2,3'"]
                      for units in (4, 8)]  # each setting once, at its longest budget, told all three
    assert "build.hidden_units=8 trains once, to 3 epochs, for fit.epochs=1,2,3" in caplog.text
    assert "(3 epochs not repeated" in caplog.text
    told = f"+hydra.job.env_set.{budgets.REFERENCE}=3"  # the reference's settings are hidden_units=8's: recorded there
    assert [told in job for job in planned(tiny_archive, tmp_path, reference=GRID[3])] == [False, True]
    assert "build.hidden_units=8 also records the early-stopping reference job" in caplog.text
    for beyond in (["build.hidden_units=8", "fit.epochs=4"], ["build.hidden_units=2", "fit.epochs=3"]):
        assert not any(told.split("=")[0] in line for job in planned(tiny_archive, tmp_path, reference=beyond)
                       for line in job), beyond  # (longer than any training, or no setting's own: trained alone)
    for settings, why in ((["sweep.share_budgets=false"], "sweep.share_budgets=false"),
                          (["fit=early_stopping"], "fit.early_stopping.enabled=true (early stopping reads the budget"),
                          (["fit.checkpoint_every=${fit.epochs}"], "fit.checkpoint_every differs between the budgets "
                                                                     "(1 at 1, 2 at 2): it reads fit.epochs"),
                          (["build.embedding_dim=0"], "its settings do not compose (build.embedding_dim=0 is not allowed")):
        caplog.clear()
        alone = planned(tiny_archive, tmp_path, *settings, grid=GRID[1:3])
        assert alone == [GRID[1], GRID[2]], settings  # every job, as it was
        assert f"sweep: trains fit.epochs=1,2 separately: {why}" in caplog.text, caplog.text  # (one setting: no name)
    assert budgets.with_budget(["build.hidden_units=4", "fit.epochs=3"], "1") == ["build.hidden_units=4", "fit.epochs=1"]

    # a job asked twice (a value given twice on an axis) runs once, sharing or not; jobs trained separately launch in
    # the sweep's order
    twice = [["build.hidden_units=4", f"fit.epochs={epochs}"] for epochs in (2, 2, 3)]
    caplog.clear()
    assert planned(tiny_archive, tmp_path, grid=twice) == [[*twice[2], f"+hydra.job.env_set.{budgets.BUDGETS}='2,3'"]]
    assert "sweep: build.hidden_units=4 fit.epochs=2 is asked 2 times: it runs once" in caplog.text
    assert planned(tiny_archive, tmp_path, "sweep.share_budgets=false", grid=twice) == [twice[0], twice[2]]
    assert planned(tiny_archive, tmp_path, "sweep.share_budgets=false", grid=GRID[:3]) == GRID[:3]

    # a resume: each line says what will be trained, for the budgets not finished before, as the job will find them
    for done, said in (({(4, 1), (4, 2), (8, 3)}, [
            "build.hidden_units=4 trains to 3 epochs for fit.epochs=3 alone; fit.epochs=1,2 finished before",
            "build.hidden_units=8 trains once, to 2 epochs, for fit.epochs=1,2, each recorded as its own run (1 epoch not "
            "repeated; sweep.share_budgets=false: each alone); fit.epochs=3 finished before"]),
            ({(8, 1), (8, 2), (8, 3)}, ["build.hidden_units=4 trains once, to 3 epochs, for fit.epochs=1,2,3,",
                                        "build.hidden_units=8 fit.epochs=1,2,3 finished before: not trained again"])):
        caplog.clear()
        resumed = planned(tiny_archive, tmp_path, reference=GRID[3],
                          finished=lambda settings, job: (settings.build.hidden_units, settings.fit.epochs) in done)
        assert all(line in caplog.text for line in said), caplog.text
        # (hidden_units=8's training, the reference's settings, does not reach its 3 epochs: it is not told to record it)
        assert not any(told in line for job in resumed for line in job) and "also records" not in caplog.text


def test_the_plan_composes_each_setting_once_and_gets_the_settings_hydra_gives_each_job(tiny_archive, tmp_path):
    """Jobs that differ only in plain values are composed once and the others set from it: every job's settings as
    Hydra composes it alone, with interpolations, config groups, additions and a key given twice among them."""
    config.register()
    jobs = [["build.hidden_units=4", "fit.epochs=3"], ["build.hidden_units=8", "fit.epochs=1"],
            ["build.hidden_units=8", "fit.checkpoint_every=${fit.epochs}", "fit.epochs=2"],
            ["build.hidden_units=4", "fit.checkpoint_every=1", "fit.epochs=5"],
            ["build=cnn", "build.hidden_units=8", "fit.epochs=2"], ["build=tutorial", "build.hidden_units=8", "fit.epochs=2"],
            ["+sweep.threads=1", "build.hidden_units=8", "fit.epochs=2"], ["fit.epochs=2", "fit.epochs=4"],
            ["build.hidden_units=8", "fit=early_stopping", "fit.epochs=3"]]
    loaded = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        def load(job):
            loaded.append(job)
            return compose(config_name="config", overrides=[*tiny_overrides(tiny_archive, tmp_path), *job])

        compose_job = budgets.composer(load)
        for job in jobs:
            assert compose_job(job) == config.load(load(job)), job
    assert len(loaded) - len(jobs) == 7  # (beyond each job composed above) jobs 1, 3 and 5-9: 2 set from 1, 4 from 3


@pytest.mark.slow
def test_each_budget_recorded_from_a_shared_training_equals_a_training_of_that_budget_alone(tiny_run, tmp_path):
    """Same seed: the budgets 1, 2 and 3 of one training against a training of 1 epoch alone and the suite's tiny
    run (3 epochs alone), read back from the store to its last digit; and a sweep's early-stopping reference job
    recorded from that training against the same job trained alone."""
    from pipeline.train import train

    alone_cfg = tiny_run[0]
    cfg = replace(alone_cfg, tracking=replace(alone_cfg.tracking, uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))

    def at(epochs: int, name: str):
        return replace(cfg, fit=replace(cfg.fit, epochs=epochs), tracking=replace(cfg.tracking, run_name=name))

    stopping = replace(cfg.fit.early_stopping, patience=1)  # (it stops this tiny training after epoch 2)
    reference = budgets.reference_of(replace(at(3, "shared,epochs=reference"), fit=replace(at(3, "").fit, early_stopping=stopping)))
    train(at(3, "shared,epochs=3"), budgets=[at(1, "shared,epochs=1"), at(2, "shared,epochs=2")], reference=reference)
    train(at(1, "alone,epochs=1"))
    train(replace(reference, tracking=replace(reference.tracking, run_name="alone,epochs=reference")))
    runs = {}
    for uri in (cfg.tracking.uri, alone_cfg.tracking.uri):
        client = MlflowClient(uri)
        for run in client.search_runs([client.get_experiment_by_name("imdb-sentiment").experiment_id]):
            runs[run.info.run_name if uri == cfg.tracking.uri else "alone,epochs=3"] = (client, run)
    first = runs["shared,epochs=1"][1]
    stopped = runs["shared,epochs=reference"][1].data.metrics
    assert (stopped.get("stopped_epoch"), stopped.get("best_epoch")) == (2, 1), stopped  # it stopped, the best restored
    for epochs in (1, 2, 3, "reference"):
        client, run = runs[f"shared,epochs={epochs}"]
        assert run.info.status == "FINISHED" and run.data.params["fit.epochs"] == str(3 if epochs == "reference" else epochs)
        assert run.data.tags["pipeline.training"] == first.info.run_id  # the run the training started in
        assert run.data.tags["pipeline.training.budgets"] == "1,2,3"
        assert f"started in run {first.info.run_id}" in run.data.tags["mlflow.note.content"]
        assert run.info.start_time == first.info.start_time  # each budget's run starts with the training
        trained = int(run.data.metrics["epochs_trained"])
        assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "epoch_seconds")) == list(
            range(1, trained + 1)) and (trained == epochs or epochs == "reference")
        models = sorted(m.name.split(" of ")[0] for m in client.search_logged_models(
            [run.info.experiment_id], f"source_run_id = '{run.info.run_id}'"))
        assert any(name.split("last-epoch-")[-1].split("-")[0] == str(trained) for name in models) or \
            epochs == "reference", models
        # every run its five figures (budgets serving one epoch log its threshold figures drawn once)
        assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {f"figures/{name}.png" for name in (
            "loss", "accuracy", "roc_curve", "precision_recall_curve", "confusion_matrix")}
        if epochs == 2:
            continue
        alone_client, alone = runs[f"alone,epochs={epochs}"]
        assert "pipeline.training" not in alone.data.tags
        for curve in CURVES:  # every epoch's values, the same numbers
            assert [(p.step, p.value) for p in sorted(client.get_metric_history(run.info.run_id, curve),
                                                      key=lambda p: p.step)] == \
                   [(p.step, p.value) for p in sorted(alone_client.get_metric_history(alone.info.run_id, curve),
                                                      key=lambda p: p.step)], (epochs, curve)
        # (model.size_mb aside: the saved model's layer names count the models built in the process so far)
        scored = {key: value for key, value in alone.data.metrics.items()  # (with early stopping: stopped_epoch, ...)
                  if key.startswith(("test_", "best", "last.", "model.", "stopped", "epochs")) and key != "model.size_mb"}
        assert len(scored) > 10 and {key: run.data.metrics[key] for key in scored} == scored
        same = ("tracking.run_name", "tracking.uri", "cache_dir")
        assert {k: v for k, v in run.data.params.items() if k not in same} == \
               {k: v for k, v in alone.data.params.items() if k not in same}
        assert models == sorted(m.name.split(" of ")[0] for m in alone_client.search_logged_models(
            [alone.info.experiment_id], f"source_run_id = '{alone.info.run_id}'"))
        # each checkpoint's own metrics (the Models tab's columns): the same keys, the same numbers but for the times
        # and the size, a budget laid out as the first one's too (its served model's size was left unlinked)
        linked = [{m.name.split(" of ")[0]: {p.key: p.value for p in m.metrics or []}
                   for m in c.search_logged_models([r.info.experiment_id], f"source_run_id = '{r.info.run_id}'")}
                  for c, r in ((client, run), (alone_client, alone))]
        assert {name: set(values) for name, values in linked[0].items()} == \
               {name: set(values) for name, values in linked[1].items()}, epochs
        same_numbers = [{name: {k: v for k, v in values.items() if k not in ("model.size_mb", "epoch_seconds")}
                         for name, values in each.items()} for each in linked]
        assert same_numbers[0] == same_numbers[1], epochs


@pytest.mark.slow
def test_a_budget_whose_record_fails_fails_the_training_and_every_later_budget(tiny_run, tmp_path, monkeypatch):
    """Budgets are recorded beside the training (tracking/budgets.py): the first budget's evaluation fails there, and,
    whenever training hears of it, the training stops and every budget from the first on that has a run ends FAILED
    with that error, none left RUNNING, none recorded FINISHED after it; train() raises it."""
    from pipeline import evaluate
    from pipeline.train import train

    cfg = replace(tiny_run[0], tracking=replace(tiny_run[0].tracking, uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    checkpoints = evaluate.checkpoints

    def failing(model, data, fitted, *args, **kwargs):
        if len(fitted.history) == 1:
            raise ArithmeticError("the first budget's evaluation failed")
        return checkpoints(model, data, fitted, *args, **kwargs)

    monkeypatch.setattr(evaluate, "checkpoints", failing)

    def at(epochs: int):
        return replace(cfg, fit=replace(cfg.fit, epochs=epochs), tracking=replace(cfg.tracking, run_name=f"epochs={epochs}"))

    with pytest.raises(ArithmeticError, match="first budget's evaluation failed"):
        train(at(4), budgets=[at(1), at(2), at(3)])
    client = MlflowClient(cfg.tracking.uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("imdb-sentiment").experiment_id])}
    # the budgets opened by the time training heard of it (at budget 2 at the soonest: budget 2's run opens as budget
    # 1's record begins); in a sweep the others are recorded FAILED too, as children of the sweep's run
    opened = sorted(runs)
    assert opened[:2] == ["epochs=1", "epochs=2"] and opened == [f"epochs={n}" for n in range(1, len(opened) + 1)]
    for name, run in runs.items():
        assert run.info.status == "FAILED", (name, run.info.status)
        assert "ArithmeticError: the first budget's evaluation failed" in run.data.tags["error"], name
        assert "pipeline.complete" not in run.data.tags, name


@pytest.mark.slow
def test_an_interrupt_while_budgets_wait_for_their_record_records_each_whole_and_leaves_none_running(
        tiny_run, tmp_path, monkeypatch):
    """Ctrl-C (SIGNALS installed, as by the command line) while the first budget's record is slow and the later
    budgets wait behind it: each budget reached is recorded whole, FINISHED, and the open run ends KILLED after them.
    (The signal, sent again every half second until a run ended on it, cut the wait: the records not begun were
    dropped, their runs left RUNNING for ever, their watchdogs told they had ended.)"""
    import os
    import signal
    import time

    from pipeline import evaluate
    from pipeline.signals import SIGNALS
    from pipeline.train import train

    cfg = replace(tiny_run[0], tracking=replace(tiny_run[0].tracking, uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    checkpoints = evaluate.checkpoints

    def slow(model, data, fitted, *args, **kwargs):
        if len(fitted.history) == 1:  # (on the recorder's thread: training goes on, and reaches budgets 2 and 3)
            client, deadline = MlflowClient(cfg.tracking.uri), time.monotonic() + 120
            while not client.search_runs([fitted_experiment(client)], "attributes.run_name = 'epochs=400'"):
                assert time.monotonic() < deadline, "training did not reach budget 3 in 120 s"
                time.sleep(0.05)  # (until the longest budget's run is open: budgets 2 and 3 wait behind this record)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.5)  # (three redeliveries' time)
        return checkpoints(model, data, fitted, *args, **kwargs)

    def fitted_experiment(client) -> str:
        return client.get_experiment_by_name("imdb-sentiment").experiment_id

    monkeypatch.setattr(evaluate, "checkpoints", slow)

    def at(epochs: int):
        return replace(cfg, fit=replace(cfg.fit, epochs=epochs), tracking=replace(cfg.tracking, run_name=f"epochs={epochs}"))

    with SIGNALS.installed(), pytest.raises(KeyboardInterrupt):
        train(at(400), budgets=[at(1), at(2), at(3)])
    client = MlflowClient(cfg.tracking.uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("imdb-sentiment").experiment_id])}
    assert {name: run.info.status for name, run in runs.items()} == {
        "epochs=1": "FINISHED", "epochs=2": "FINISHED", "epochs=3": "FINISHED", "epochs=400": "KILLED"}
    assert max(runs[f"epochs={b}"].info.end_time for b in (1, 2, 3)) <= runs["epochs=400"].info.end_time


@pytest.mark.slow
@pytest.mark.parametrize("what", ["interrupted", "failed", "failed-once-open"])
def test_the_next_budgets_run_opens_beside_the_training_and_an_interrupt_or_failure_there_leaves_the_record_true(
        tiny_run, tmp_path, monkeypatch, what):
    """The next budget's run opens on a thread of its own while training goes on (tracking/budgets.py). Its open is
    slow here. A Ctrl-C as it opens: the open finishes, and the run ends KILLED with every epoch trained (those that
    ended while it opened included), after the budget before it FINISHED. An open that fails after its run was
    created (as it was set up, or once open, as its setup was copied): the training fails with it, that run is FAILED
    once (not left RUNNING, nor recorded FAILED again as a budget not reached), and, in a sweep, each later budget has
    its FAILED child."""
    import os
    import signal
    import time

    import mlflow

    from pipeline.config import EXPERIMENT, PARENT_RUN
    from pipeline.signals import SIGNALS
    from pipeline.tracking import TrackedRun
    from pipeline.tracking.budgets import SharedRuns
    from pipeline.train import train

    cfg = replace(tiny_run[0], tracking=replace(tiny_run[0].tracking, uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.create_experiment("imdb-sentiment", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="the sweep")
    monkeypatch.setenv(EXPERIMENT, experiment)
    monkeypatch.setenv(PARENT_RUN, parent.info.run_id)  # (as a sweep's job: its runs are the sweep's children)
    found = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(None)  # (a job's store is the variable's; an earlier test set one in this process)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    setup, summary, record, trained = TrackedRun._record_setup, TrackedRun.model_summary, SharedRuns.record, []

    def slow_setup(run):
        setup(run)
        if run.cfg.tracking.run_name == "epochs=2":  # (on the opener's thread, its run created)
            if what == "failed":  # (its run created)
                raise ConnectionError("the store went away as budget 2's run opened")
            if what == "interrupted":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.5)  # (training goes on meanwhile, and the signal is sent again, while the run opens)

    def failing_summary(run, *args):
        if what == "failed-once-open" and run.cfg.tracking.run_name == "epochs=2":
            raise ConnectionError("the store went away as budget 2's run took the training's setup")
        return summary(run, *args)

    def counted(shared, epoch, values):
        trained.append(epoch)
        return record(shared, epoch, values)

    monkeypatch.setattr(TrackedRun, "_record_setup", slow_setup)
    monkeypatch.setattr(SharedRuns, "record", counted)
    monkeypatch.setattr(TrackedRun, "model_summary", failing_summary)

    def at(epochs: int):
        return replace(cfg, fit=replace(cfg.fit, epochs=epochs), tracking=replace(cfg.tracking, run_name=f"epochs={epochs}"))

    try:
        with SIGNALS.installed(), pytest.raises(KeyboardInterrupt if what == "interrupted" else ConnectionError):
            train(at(400), budgets=[at(1), at(2), at(3)])
    finally:
        mlflow.set_tracking_uri(found)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(run.info.run_name for run in children)
    statuses = {run.info.run_name: run.info.status for run in children}
    if what == "interrupted":
        assert statuses == {"epochs=1": "FINISHED", "epochs=2": "KILLED"}, statuses  # (the later ones: not reached)
        killed = next(run for run in children if run.info.run_name == "epochs=2")
        steps = sorted(point.step for point in client.get_metric_history(killed.info.run_id, "val_loss"))
        assert steps == trained == list(range(1, len(trained) + 1)) and len(trained) >= 1, (steps, trained)
    else:
        assert names == ["epochs=1", "epochs=2", "epochs=3", "epochs=400"], names  # each once
        assert statuses == {"epochs=1": "FINISHED", "epochs=2": "FAILED", "epochs=3": "FAILED",
                            "epochs=400": "FAILED"}, statuses
        assert all("the store went away" in run.data.tags["error"] for run in children
                   if run.info.run_name != "epochs=1")


def test_the_report_says_how_many_trainings_the_budgets_were_recorded_from():
    import pandas as pd

    from pipeline.analysis_text import shared_trainings

    table = pd.DataFrame({"job": list("abcde"), "run_id": list("abcde"), "training": ["a", "a", "a", None, None],
                          "epochs_trained": [10, 20, 30, 10, 20], "epoch_seconds": [0.3, 0.15, 0.1, 0.3, 0.15]})
    numbers, lines = shared_trainings(table)  # three budgets of one training; two jobs that trained alone
    assert numbers == {"trainings": 3.0, "epochs_not_repeated": 30.0}
    # (each epoch not repeated at the pace of its training's longest budget, not at the shorter budgets' own medians,
    # which their compiling first epoch weighs on: 30 epochs at 0.1 s)
    assert "5 budgets recorded from 3 trainings; 30 of 90 epochs not repeated** (about 3 s of training" in lines[-1]
    assert shared_trainings(table.assign(training=None)) == ({}, [])  # nothing shared: nothing said


# In a sweep's process: group 1's longest budget's record (hidden_units=4, LAST epochs, scored on the test split) waits
# until the run NEXT is open (MODE "at-the-end": until it has ended: the sweep's jobs are done), then goes on, fails or
# sends Ctrl-C (MODE); with the switch off it does not wait (its job would never end). Installed as sitecustomize: it
# wraps pipeline.evaluate.checkpoints once imported.
SLOW_LAST_RECORD = """
import importlib.util, os, signal, sys, time

MODE, LAST, NEXT = {mode!r}, {last!r}, {next!r}


def wrap(module):
    checkpoints = module.checkpoints

    def recorded(model, data, fitted, *args, **kwargs):
        if MODE != "off" and len(fitted.history) == LAST and model.get_layer("hidden_1").units == 4:
            from mlflow import MlflowClient

            client, deadline = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), time.monotonic() + 120
            ended = " and attributes.status = 'FINISHED'" if MODE == "at-the-end" else ""
            while not client.search_runs([os.environ["PIPELINE_SWEEP_EXPERIMENT_ID"]],
                                         f"attributes.run_name = '{{NEXT}}'{{ended}}"):
                assert time.monotonic() < deadline, "the next job did not start in 120 s"
                time.sleep(0.05)
            if MODE == "failed":
                raise ArithmeticError("the last budget's record failed")
            if MODE in ("interrupted", "at-the-end"):
                os.kill(os.getpid(), signal.SIGINT)  # (the next job's training is interrupted; this record goes on)
                time.sleep(1.5)
        return checkpoints(model, data, fitted, *args, **kwargs)

    module.checkpoints = recorded


class Wrapping:
    def find_spec(self, name, path=None, target=None):
        if name != "pipeline.evaluate":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            wrap(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Wrapping())
"""


def two_groups(tiny_archive, tmp_path: Path, mode: str, *settings: str, last: int = 2,
               next_run: str = "hidden_units=8,epochs=1") -> tuple[subprocess.CompletedProcess, dict]:
    """The sweep build.hidden_units=4,8 fit.epochs=1,`last` (two trainings) in its own store, with SLOW_LAST_RECORD in
    `mode`; (the finished process, its children by name)."""
    from tests.helpers import created_store, environment

    folder = tmp_path / mode
    hook = folder / "hook"
    hook.mkdir(parents=True)
    (hook / "sitecustomize.py").write_text(SLOW_LAST_RECORD.format(mode=mode, last=last, next=next_run))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = created_store(uri)
    overrides = [o for o in tiny_overrides(tiny_archive, folder) if not o.startswith("tracking.uri")]
    done = subprocess.run([sys.executable, "-m", "pipeline", "-m", *overrides, f"tracking.uri={uri}",
                           "build.hidden_units=4,8", f"fit.epochs=1,{last}", f"hydra.sweep.dir={folder / 'multirun'}",
                           *settings], cwd=folder, env=environment(PYTHONPATH=f"{hook}{os.pathsep}{PROJECT}"),
                          capture_output=True, text=True, timeout=600)
    every = client.search_runs([client.get_experiment_by_name("imdb-sentiment").experiment_id])
    return done, {run.info.run_name: run for run in every if run.data.tags.get("sweep.parent") != "true"} | {
        "parent": next(run for run in every if run.data.tags.get("sweep.parent") == "true")}


@pytest.mark.slow
def test_a_sweeps_last_record_goes_on_beside_its_next_job_and_equals_the_record_made_within_the_job(
        tiny_archive, tmp_path):
    """sweep.overlap_records (on): a shared training's longest budget is recorded while the sweep's next job starts
    (its run ends after that job's first run opened); off, within its job (it ends before). Every child the same
    numbers either way: each epoch's curves and the test metrics, read back from the store."""
    from tests.helpers import output

    beside, runs = two_groups(tiny_archive, tmp_path, "beside")
    within, alone = two_groups(tiny_archive, tmp_path, "off", "sweep.overlap_records=false")
    for done, children in ((beside, runs), (within, alone)):
        assert done.returncode == 0 and "sweep analysis: 4 jobs finished, 0 failed" in done.stdout, output(done)
        assert {name: run.info.status for name, run in children.items()} == {
            "parent": "FINISHED", **{f"hidden_units={u},epochs={e}": "FINISHED" for u in (4, 8) for e in (1, 2)}}
        assert all(run.data.tags.get("pipeline.complete") == "true" for name, run in children.items() if name != "parent")
    last, next_job = "hidden_units=4,epochs=2", "hidden_units=8,epochs=1"
    assert runs[last].info.end_time > runs[next_job].info.start_time  # recorded beside the next job
    assert alone[last].info.end_time <= alone[next_job].info.start_time  # recorded within its own job
    for name in runs:
        if name == "parent":
            continue
        ours, theirs = runs[name], alone[name]
        scored = {key: value for key, value in theirs.data.metrics.items()
                  if key.startswith(("test_", "best", "last.", "val_", "epochs")) and key != "model.size_mb"}
        assert len(scored) > 8 and {key: ours.data.metrics.get(key) for key in scored} == scored, name
        for curve in CURVES:
            histories = [sorted((p.step, p.value) for p in MlflowClient(uri).get_metric_history(run.info.run_id, curve))
                         for uri, run in ((f"sqlite:///{tmp_path / 'beside' / 'mlflow.db'}", ours),
                                          (f"sqlite:///{tmp_path / 'off' / 'mlflow.db'}", theirs))]
            assert histories[0] == histories[1] and len(histories[0]) == int(name[-1]), (name, curve)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["interrupted", "at-the-end", "failed"])
def test_an_interrupt_or_a_failure_while_a_last_record_goes_on_beside_the_next_job_leaves_the_record_true(
        tiny_archive, tmp_path, mode):
    """Ctrl-C while the last record goes on, in the next job's training (300 epochs: its longest budget's run open) or
    once every job has ended (the sweep waits for the record): that record is finished whole (FINISHED, complete), the
    next job's open run ends KILLED, the parent KILLED with the resume command, none RUNNING. The record failing
    instead: its run ends FAILED with the error, the next job is recorded, the analysis counts one failed job, exit 1."""
    from tests.helpers import output

    epochs = 300 if mode == "interrupted" else 2
    done, children = two_groups(tiny_archive, tmp_path, mode, last=epochs,
                                next_run=f"hidden_units=8,epochs={epochs if mode != 'failed' else 1}")
    last = children.pop(f"hidden_units=4,epochs={epochs}")
    parent = children.pop("parent")
    assert children["hidden_units=4,epochs=1"].info.status == "FINISHED"
    if mode != "failed":
        assert done.returncode == 130, output(done)
        assert last.info.status == "FINISHED" and last.data.tags.get("pipeline.complete") == "true", output(done)
        assert "test_accuracy" in last.data.metrics
        assert parent.info.status == "KILLED" and "resume it with: " in done.stderr, output(done)
        assert {name: run.info.status for name, run in children.items()} == {
            "hidden_units=4,epochs=1": "FINISHED", "hidden_units=8,epochs=1": "FINISHED",
            f"hidden_units=8,epochs={epochs}": "KILLED" if mode == "interrupted" else "FINISHED"}, output(done)
        if mode == "interrupted":  # (its epochs to the interrupt kept; the budget not reached)
            kept = MlflowClient(f"sqlite:///{tmp_path / mode / 'mlflow.db'}").get_metric_history(
                children[f"hidden_units=8,epochs={epochs}"].info.run_id, "val_loss")
            assert 1 <= len(kept) < epochs
    else:
        assert done.returncode == 1, output(done)
        assert last.info.status == "FAILED" and "the last budget's record failed" in last.data.tags["error"]
        assert "pipeline.complete" not in last.data.tags
        assert {name: run.info.status for name, run in children.items()} == {
            f"hidden_units={u},epochs={e}": "FINISHED" for u, e in ((4, 1), (8, 1), (8, 2))}
        assert parent.info.status == "FINISHED" and "sweep analysis: 3 jobs finished, 1 failed" in done.stdout
        assert "hidden_units=4,epochs=2: its record failed: the last budget's record failed" in done.stdout, output(done)
