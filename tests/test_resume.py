"""A sweep's jobs see what its driver resolved, a resume asks what its sweep was asked (whatever the order it
is typed in), and one command at a time works on a sweep (fast, but for one interrupted and resumed sweep)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pandas as pd
import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import config, resume, sweep
from pipeline.config import flatten
from pipeline.tracking import holder, sweeps
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import created_store, environment, interrupt_when
from tests.test_sweeps import sweep_runs


# -- what counts as the same settings --------------------------------------------------------------------
def test_differences_name_each_changed_or_unrecorded_key_and_leave_per_attempt_keys_alone():
    before = {"fit.epochs": "5", "seed": "42", "sweep.resume": "None", "tracking.run_name": "a",
              "data.train_rows": "16", "build.hidden_units": "8"}
    now = {"fit.epochs": 6, "seed": 42, "sweep.resume": "abc", "tracking.run_name": "b", "build.l2": 0.0,
           "build.hidden_units": 64, "sweep.overlap_records": False}  # (a switch of this attempt, new or not)
    assert resume.differences(before, now, skip=("build.hidden_units",)) == {
        "build.l2": (None, "0.0"), "fit.epochs": ("5", "6")}
    assert resume.differences(before, {"seed": 42, "fit.epochs": 5}) == {}  # data.* and other records: not asked
    assert resume.differences({}, {"build.family": "cnn", "build.l2": 0.1}, skip=("build",)) == {}
    assert resume.describe({"fit.epochs": ("5", "6"), "seed": (None, "1")}) == (
        "fit.epochs: 5 before, 6 now; seed: not recorded before, 1 now")


def test_a_resume_is_checked_axis_by_axis_and_setting_by_setting():
    axes = {"build.hidden_units": "8,16"}
    resume.check_same_sweep("p", axes, axes, {"fit.epochs": "5"}, {"fit.epochs": 5, "sweep.resume": "p"})
    resume.check_same_sweep("p", axes, axes, None, {"fit.epochs": 6})  # a parent that kept no settings: axes only
    with pytest.raises(ValueError) as refused:
        resume.check_same_sweep("p", axes, {"build.hidden_units": "8,16", "seed": "1,2"}, {"fit.epochs": "5"},
                                {"fit.epochs": 6, "seed": 42})
    assert str(refused.value).startswith(
        "sweep.resume=p asks for other settings than that sweep was given: the axis seed: not swept in the sweep, "
        "1,2 now; fit.epochs: 5 in the sweep, 6 now. A resume continues the same sweep: run this as a new sweep "
        "(the same command without sweep.resume)")


def test_the_same_axes_typed_in_another_order_or_form_are_the_same_sweep():
    same = [("build.hidden_units", "8,16", "16, 8"), ("build.hidden_units", "8,16", "choice(16,8)"),
            ("build.hidden_units", "8,16", "range(8, 17, 8)"), ("build.learning_rate", "0.001,0.01", "1e-2,1e-3"),
            ("build.dropout_rate", "interval(0, 0.5)", "interval(0.0,0.5)"),
            ("build", "tutorial,nbsvm", "nbsvm,tutorial")]
    for key, before, now in same:
        assert resume.canonical_axis(key, before) == resume.canonical_axis(key, now), (before, now)
        resume.check_same_sweep("p", {key: before, "fit.epochs": "3,4"}, {"fit.epochs": "4,3", key: now}, None, {})
    for key, before, now in [("build.hidden_units", "8,16", "8,16,32"), ("build.learning_rate", "0.001", "0.01"),
                             ("build.dropout_rate", "interval(0, 0.5)", "tag(log, interval(0, 0.5))")]:
        assert resume.canonical_axis(key, before) != resume.canonical_axis(key, now), (before, now)


def test_a_job_is_known_by_its_settings_on_the_axes_not_by_its_run_name():
    axes = ["build.hidden_units", "fit.epochs"]
    job = {"build.hidden_units": "8", "fit.epochs": "3", "seed": "42", "sweep.trial": "None"}
    assert resume.job_identity(job, axes, "hidden_units=8,epochs=3") == resume.job_identity(
        {**job, "seed": "1", "data.train_rows": "16"}, list(reversed(axes)), "epochs=3,hidden_units=8")
    assert resume.job_identity(job, axes, "a") != resume.job_identity({**job, "fit.epochs": "4"}, axes, "a")
    # two trials of a search that drew the same values are two jobs; the early-stopping reference is a job of its own
    assert resume.job_identity(job, axes, "a") != resume.job_identity({**job, "sweep.trial": "7"}, axes, "a")
    assert resume.job_identity(job, axes, "a") != resume.job_identity(job, axes, "early_stopping,hidden_units=8")
    # a group axis: every setting under it; a run that recorded no settings (a job refused at once): its name
    family = {"build.family": "nbsvm", "build.ngrams": "2"}
    other = {**family, "build.ngrams": "1"}
    assert resume.job_identity(family, ["build"], "x") != resume.job_identity(other, ["build"], "x")
    assert resume.job_identity({}, axes, "hidden_units=0,epochs=3") == resume.job_identity(
        {}, axes, "epochs=3,hidden_units=0")


def test_a_holder_whose_process_is_gone_or_silent_does_not_hold_the_sweep():
    here = {"host": socket.gethostname(), "pid": os.getpid(), "started": __import__("psutil").Process().create_time(),
            "heartbeat": 0}
    assert holder.alive(here)
    assert not holder.alive({**here, "started": here["started"] - 60})  # that pid, now another process
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert not holder.alive({**here, "pid": ended.pid})
    elsewhere = {**here, "host": "another-host", "heartbeat": time.time() - 10}
    assert holder.alive(elsewhere) and not holder.alive({**elsewhere, "heartbeat": time.time() - holder.STALE - 1})


@pytest.mark.parametrize("cause", ["a second Ctrl-C while the run ended", "a sweep's"])
def test_an_interrupt_that_was_said_is_not_said_again(cause, capsys, monkeypatch):
    from pipeline.__main__ import stopped
    from pipeline.signals import Interrupted

    if cause == "a sweep's":  # a sweep's parent is open: its end says what it kept, as the process ends
        monkeypatch.setenv(config.PARENT_RUN, "abc")
        interrupt = Interrupted(signal.SIGINT)
    else:
        try:
            try:
                raise Interrupted(signal.SIGINT)
            except KeyboardInterrupt as first:
                first.reported = True  # (TrackedRun said "ended KILLED")
                raise Interrupted(signal.SIGINT)
        except KeyboardInterrupt as second:
            interrupt = second
    with pytest.raises(SystemExit) as ended:
        stopped(interrupt)
    assert ended.value.code == 130 and capsys.readouterr().err == ""


@pytest.mark.parametrize("launcher", ["joblib", "basic"])
def test_an_interrupted_joblib_sweep_leaves_no_child_running(launcher, tmp_path, monkeypatch, capsys):
    """Ctrl-C of a joblib sweep's driver: joblib (loky) kills its workers' process trees, their watchdogs with them,
    before the interrupt reaches the driver, so no job ends its runs (a shared training's budgets: every one it had
    opened). The driver's end ends each child still RUNNING KILLED, saying why, and the parent KILLED; a job in the
    driver's own process (the basic launcher) ends its run itself, and the driver leaves it as it is."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = created_store(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # (as the driver's: an earlier test in this process may have set another)
    experiment = client.create_experiment("sweep")
    parent = client.create_run(experiment).info.run_id
    children = [client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(3)]
    client.set_terminated(children[0], "FINISHED")  # (a budget recorded before the interrupt)
    callback = sweep.SweepCallback()
    callback.parent, callback.on_joblib = parent, launcher == "joblib"
    callback._abandoned()
    assert client.get_run(parent).info.status == "KILLED"
    ended = [client.get_run(child) for child in children]
    left = "KILLED" if launcher == "joblib" else "RUNNING"  # (basic: the job's own run, in this process, ends it)
    assert [run.info.status for run in ended] == ["FINISHED", left, left]
    assert "error" not in ended[0].data.tags
    if launcher == "joblib":
        assert all(run.data.tags["error"] == "its sweep's driver ended, and joblib stopped the job's worker process"
                   for run in ended[1:])
    assert f"sweep {parent} ended KILLED before its jobs did; resume it with: " in capsys.readouterr().err


def test_the_settings_a_child_records_compare_equal_to_the_same_settings_asked_again(tiny_config):
    recorded = resume.as_recorded(flatten(tiny_config))  # what MLflow keeps: log_params writes str(value)
    assert resume.differences(recorded, flatten(tiny_config)) == {}
    changed = replace(tiny_config, fit=replace(tiny_config.fit, epochs=6), stages=["ingest", "split"])
    assert set(resume.differences(recorded, flatten(changed))) == {"fit.epochs", "stages"}


def test_the_resume_command_is_the_users_own_plus_the_parent_and_pastes_as_it_is():
    argv = ["python", "-m", "pipeline", "-m", "build.hidden_units=8,16", "tracking.run_name=my sweep"]
    command = resume.resume_command(argv, "abc123")
    assert command == "python -m pipeline -m build.hidden_units=8,16 'tracking.run_name=my sweep' sweep.resume=abc123"
    assert shlex.split(command) == [*argv, "sweep.resume=abc123"]
    again = resume.resume_command([*argv, "sweep.resume=old"], "abc123")  # resumed, and interrupted again
    assert again == command
    under_mlflow = resume.resume_command(["python", "-m", "pipeline", "--overrides", "a=1 sweep.resume=old"], "p")
    assert shlex.split(under_mlflow) == ["python", "-m", "pipeline", "--overrides", "a=1", "sweep.resume=p"]


# -- what the driver resolved reaches the jobs -----------------------------------------------------------
def test_relative_paths_mean_the_drivers_directory_wherever_the_job_runs(tiny_config):
    relative = replace(tiny_config, ingest=replace(tiny_config.ingest, path="data/imdb.tar.gz"), cache_dir=".cache/p",
                       tracking=replace(tiny_config.tracking, uri="sqlite:///mlflow.db"))
    seen = sweep.absolute(relative, "/home/me/project")
    assert (seen.ingest.path, seen.cache_dir, seen.tracking.uri) == (
        "/home/me/project/data/imdb.tar.gz", "/home/me/project/.cache/p", "sqlite:////home/me/project/mlflow.db")
    assert sweep.absolute(seen, "/elsewhere") == seen  # absolute stays as it is
    for uri, expected in [("file:mlruns", "file:/d/mlruns"), ("./mlruns", "/d/./mlruns"),
                          ("http://server:5000", "http://server:5000"), ("databricks", "databricks"),
                          ("sqlite:////abs/m.db", "sqlite:////abs/m.db"), ("file:///abs/mlruns", "file:///abs/mlruns")]:
        assert sweep.absolute_uri(uri, "/d") == expected, uri


def test_the_variables_the_config_reads_and_mlflows_settings_are_forwarded(monkeypatch):
    from hydra import compose, initialize_config_dir
    from tests.conftest import CONF

    monkeypatch.setenv("IMDB_ARCHIVE", "data/mine.tar.gz")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        forwarded = sweep.driver_environment(compose(config_name="config"))
    assert forwarded["IMDB_ARCHIVE"] == "data/mine.tar.gz" and forwarded["MLFLOW_TRACKING_USERNAME"] == "me"
    assert "UNRELATED_SECRET" not in forwarded


def test_data_a_worker_cannot_read_fails_at_once_naming_the_path_and_the_host(tiny_config, tmp_path, monkeypatch):
    missing = replace(tiny_config, ingest=replace(tiny_config.ingest, path=str(tmp_path / "absent.tar.gz")))
    monkeypatch.setenv(sweep.DRIVER_HOST, socket.gethostname())
    sweep.readable_here(missing)  # the driver's own host: as a single run (a download, if allowed)
    monkeypatch.setenv(sweep.DRIVER_HOST, "the-drivers-laptop")  # another host than the driver's
    with pytest.raises(FileNotFoundError) as refused:
        sweep.readable_here(missing)
    assert str(tmp_path / "absent.tar.gz") in str(refused.value) and socket.gethostname() in str(refused.value)
    sweep.readable_here(tiny_config)  # there, and readable
    monkeypatch.setenv(sweep.DRIVER_HOST, socket.gethostname())
    monkeypatch.setenv(sweep.DRIVER_DATA, missing.ingest.path)  # the driver could read it; this worker cannot
    with pytest.raises(FileNotFoundError, match="cannot be read on host"):
        sweep.readable_here(missing)


# -- the parent: a resume asking otherwise is refused before any write --------------------------------------
def test_a_resume_asking_other_settings_leaves_the_parent_as_it_was(tiny_archive, tmp_path):
    settings = compose_config(tiny_overrides(tiny_archive, tmp_path))
    axes = {"build.hidden_units": "8,16"}
    parent, _, _ = sweeps.open_sweep_parent(settings, axes, "multirun/1")
    sweeps.close_sweep_parent(parent, "FINISHED")
    client = MlflowClient(settings.tracking.uri)
    before = client.get_run(parent)
    asked = replace(settings, sweep=replace(settings.sweep, resume=parent))
    for changed, axes_now, named in [
            (asked, {"build.hidden_units": "8,64"}, "the axis build.hidden_units: 8,16 in the sweep, 8,64 now"),
            (replace(asked, fit=replace(asked.fit, epochs=6)), axes, "fit.epochs: 3 in the sweep, 6 now"),
            (asked, {"build.hidden_units": "8,16", "seed": "1,2"}, "the axis seed")]:
        with pytest.raises(ValueError) as refused:
            sweeps.open_sweep_parent(changed, axes_now, "multirun/2")
        assert named in str(refused.value) and "without sweep.resume" in str(refused.value)
        after = client.get_run(parent)
        assert (after.info.status, after.info.end_time, after.data.params, after.data.tags) == (
            "FINISHED", before.info.end_time, before.data.params, before.data.tags)
    assert len(client.search_runs([before.info.experiment_id])) == 1  # no other run made
    # the same settings (another run name, verbose): continued
    same = replace(asked, verbose=True, tracking=replace(asked.tracking, run_name="again"))
    assert sweeps.open_sweep_parent(same, {"build.hidden_units": "16,8"}, "multirun/3")[0] == parent  # values reordered
    assert client.get_run(parent).info.status == "RUNNING"
    assert json.loads(client.get_run(parent).data.tags[holder.TAG])["pid"] == os.getpid()  # held by this process
    # Its children as a resumed sweep leaves them: each job counted once, whatever its runs were named; an
    # interrupted attempt finished since is no failure, one not finished since is said as interrupted
    from mlflow.entities import Metric, Param

    def child(name, status, units, curves=False):
        run = client.create_run(before.info.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent})
        metrics = [Metric(key, 0.5, 0, epoch) for key in ("loss", "accuracy", "val_loss", "val_accuracy",
                                                          "epoch_seconds") for epoch in (1, 2)] if curves else []
        client.log_batch(run.info.run_id, metrics=metrics + [Metric("test_accuracy", 0.5, 0, 0)] * curves,
                         params=[Param("build.hidden_units", units), Param("fit.epochs", "2")])
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    child("epochs=2,hidden_units=8", "KILLED", "8")
    done = child("hidden_units=8,epochs=2", "FINISHED", "8", curves=True)
    stopped = child("hidden_units=16,epochs=2", "KILLED", "16")
    axes, jobs, _, failed, _, interrupted = sweeps.read_jobs(parent, "fit.epochs")
    assert [job["run_id"] for job in jobs] == [done] and failed == []
    assert [job["run_id"] for job in interrupted] == [stopped]
    sweeps.close_sweep_parent(parent, "FINISHED")
    assert holder.TAG not in client.get_run(parent).data.tags  # and let go of at its end


# -- an interrupted sweep, resumed as a user would: in another order, twice at once, after a killed resume ---
@pytest.mark.slow
def test_an_interrupted_sweep_resumed_in_another_order_runs_each_missing_job_once(tiny_archive, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Half the jobs train 200 epochs (a few seconds each; Hydra runs them after the three 2-epoch ones):
    # the sweep is still running when two jobs have finished and the interrupt comes, however fast the
    # short jobs are.
    prefix = [sys.executable, "-m", "pipeline", "-m", *tiny_overrides(tiny_archive, tmp_path)]
    axes, suffix = ["build.hidden_units=4,8,12", "fit.epochs=2,200"], [f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    args = prefix + axes + suffix
    client = created_store(uri)
    process = subprocess.Popen(args, cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)

    def two_finished() -> bool:
        experiment = client.get_experiment_by_name("imdb-sentiment")
        return bool(experiment) and len(client.search_runs([experiment.experiment_id],
                                                           "attributes.status = 'FINISHED'")) >= 2

    _, printed = interrupt_when(process, two_finished)
    deadline = time.monotonic() + 300
    parent, children = sweep_runs(uri)
    assert parent.info.status == "KILLED", printed[-3000:]
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)  # none left RUNNING
    finished_before = {c.info.run_name: c.info.run_id for c in children if c.info.status == "FINISHED"}
    assert 2 <= len(finished_before) < 6
    # the last words on the terminal: the command that resumes it, the user's own plus the parent
    said = [line for line in printed.splitlines() if "resume it with: " in line]
    assert len(said) == 1 and said[0].startswith(f"sweep {parent.info.run_id} ended KILLED"), printed[-3000:]
    assert "stopped before a run was recorded" not in printed
    command = shlex.split(said[0].split("resume it with: ", 1)[1])
    resumed = f"sweep.resume={parent.info.run_id}"
    assert command == [*args, resumed]

    # A resume killed outright (SIGKILL) once it holds the sweep: it does not hold it forever.
    killed = subprocess.Popen(command, cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        while json.loads(client.get_run(parent.info.run_id).data.tags.get(holder.TAG, "{}")).get("pid") != killed.pid:
            assert killed.poll() is None and time.monotonic() < deadline + 300
            time.sleep(0.2)
    finally:
        killed.kill()
        killed.wait()
    # Two resumes at once, typed with the keys and the values in other orders: the same sweep. One runs the
    # jobs still missing; the other is refused in one line naming the command that holds the sweep.
    started = time.time()
    together = [subprocess.Popen(prefix + order + suffix + [resumed], cwd=tmp_path, env=environment(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for order in (["fit.epochs=200,2", "build.hidden_units=12,4,8"],
                              ["build.hidden_units=8,12,4", "fit.epochs=200,2"])]
    printed = [p.communicate(timeout=900)[0] for p in together]
    assert sorted(p.returncode for p in together) == [0, 2], [text[-3000:] for text in printed]
    won = 0 if together[0].returncode == 0 else 1
    refusal = [line for line in printed[1 - won].splitlines() if "is being worked on by another command" in line]
    assert len(refusal) == 1, printed[1 - won][-3000:]
    assert f"(pid {together[won].pid} on {socket.gethostname()}, since " in refusal[0] and resumed in refusal[0]
    assert "Traceback" not in printed[1 - won] and "Launching" not in printed[1 - won]  # no job of its own
    assert "which has ended without letting go: taken over" in printed[won]  # the killed resume's hold
    assert "sweep analysis: 6 jobs finished, 0 failed\n" in printed[won] and "job(s) failed" not in printed[won]

    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED" and holder.TAG not in parent.data.tags
    assert (parent.data.metrics["jobs_finished"], parent.data.metrics["jobs_failed"]) == (6, 0)
    finished = [c for c in children if c.info.status == "FINISHED"]
    names = sorted(c.info.run_name for c in finished)
    assert len(names) == len(set(names)) == 6, names  # every job finished exactly once ...
    assert all(name.startswith("hidden_units=") for name in names)  # ... named in the sweep's own order
    for name, run_id in finished_before.items():  # the ones done before were not run again
        assert {c.info.run_id for c in finished if c.info.run_name == name} == {run_id}
        assert f"already finished as run {run_id}; not run again" in printed[won]
    assert len([c for c in finished if c.info.start_time > started * 1000]) == 6 - len(finished_before)
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "analysis/jobs.csv", str(tmp_path)))
    assert len(table) == 6 and set(table.run_id) == {c.info.run_id for c in finished}
    assert len(set(zip(table["build.hidden_units"], table["fit.epochs"]))) == 6
    report = open(client.download_artifacts(parent.info.run_id, "analysis/report.md", str(tmp_path))).read()
    assert "Interrupted jobs" not in report and "Failed jobs" not in report  # the KILLED attempts finished since
