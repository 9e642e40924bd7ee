"""A sweep's jobs see what its driver resolved, and a resume asks what its sweep was asked (fast: no training)."""

from __future__ import annotations

import shlex
import socket
from dataclasses import replace

import pytest
from mlflow import MlflowClient

from pipeline import config, resume, sweep
from pipeline.config import flatten
from pipeline.tracking import sweeps
from tests.conftest import compose_config, tiny_overrides


# -- what counts as the same settings --------------------------------------------------------------------
def test_differences_name_each_changed_or_unrecorded_key_and_leave_per_attempt_keys_alone():
    before = {"fit.epochs": "5", "seed": "42", "sweep.resume": "None", "tracking.run_name": "a",
              "data.train_rows": "16", "build.hidden_units": "8"}
    now = {"fit.epochs": 6, "seed": 42, "sweep.resume": "abc", "tracking.run_name": "b", "build.l2": 0.0,
           "build.hidden_units": 64}
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
    assert sweeps.open_sweep_parent(same, axes, "multirun/3")[0] == parent
    assert client.get_run(parent).info.status == "RUNNING"
