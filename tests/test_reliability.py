"""Each case where a record could stop being trustworthy, provoked for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.parse
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline import fit
from pipeline.speed import cache
from pipeline.signals import SIGNALS
from pipeline.train import train
from tests.conftest import PROJECT, compose_config, tiny_overrides
from tests.helpers import assert_every_epoch_recorded, created_store, environment, free_port, output, runs
from tests.test_sweeps import multirun, sweep_runs


def pipeline_command(tmp_path: Path, *overrides: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "pipeline", *overrides, f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env or environment(), capture_output=True, text=True, timeout=timeout)


# -- bad input: a clear error before expensive work, nothing half-written --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mistake, message", [
    ("build.hidden_units=0", "ValueError: build.hidden_units=0 is not allowed"),
    ("fit.epoch=3", "Could not override 'fit.epoch'"),
    ("ingest.path=missing.tar.gz", "FileNotFoundError: ingest.path='missing.tar.gz' does not exist"),
    ("tracking.uri=sqlite:///notes.txt", "ValueError: tracking.uri=sqlite:///notes.txt: {tmp}/notes.txt is not an SQLite database"),
    ("tracking.uri=sqlite:///runs", "ValueError: tracking.uri=sqlite:///runs: {tmp}/runs is a folder, not a database file; "
                                    "name a file in it, e.g. tracking.uri=sqlite:///{tmp}/runs/mlflow.db"),
    ("tracking.uri=runs", "ValueError: tracking.uri=runs: a folder of files is not a store MLflow 3 opens"),
    ("tracking.uri=mlflow://localhost:5000", "ValueError: tracking.uri=mlflow://localhost:5000: MLflow knows no 'mlflow' store; "
                                             "use sqlite:///mlflow.db")],
    ids=["invalid-value", "unknown-key", "missing-path", "store-a-text-file", "store-a-folder", "store-of-files",
         "store-unknown-scheme"])
def test_a_users_mistake_is_refused_in_one_message_before_data_or_tracking(tiny_archive, tmp_path, mistake, message):
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "runs").mkdir()
    done = pipeline_command(tmp_path, *tiny_overrides(tiny_archive, tmp_path, made_store=False), mistake)
    printed = done.stdout + done.stderr
    assert done.returncode == 1 and printed.count(message.format(tmp=tmp_path)) == 1, output(done)
    assert "Traceback" not in printed and "Error executing job" not in printed
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()
    assert (tmp_path / "notes.txt").read_text() == "my notes\n" and not any((tmp_path / "runs").iterdir())


def read_only(folder: Path) -> list[str]:
    """The command prefix under which `folder` cannot be written (root writes anyway, unless it gives that up)."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("as root, a read-only folder needs setpriv to be read-only")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.slow
def test_a_read_only_working_folder_is_named_at_once_with_the_fix(tiny_archive, tmp_path):
    """Run from a folder that cannot be written, each thing the run would write there is named in one line, in
    seconds: Hydra's output folder, then (hydra.run.dir moved) the stage cache, then the tracking store. No data
    is read and nothing but Hydra's output folder is written."""
    here, elsewhere = tmp_path / "read-only", tmp_path / "writable"
    here.mkdir(), elsewhere.mkdir()
    prefix = read_only(here)
    data = [o for o in tiny_overrides(tiny_archive, tmp_path) if o.startswith(("ingest.", "split.", "build.", "fit."))]
    moved = [f"hydra.run.dir={elsewhere / 'out'}", f"cache_dir={elsewhere / 'cache'}"]
    expected = [f"PermissionError: cannot write {here}/outputs (Permission denied): run from a folder you can write, "
                "or set hydra.run.dir",
                f"PermissionError: cannot write {here}, where cache_dir=.cache/pipeline keeps its files",
                f"PermissionError: cannot write {here}, where tracking.uri=sqlite:///{here}/mlflow.db keeps its runs"]
    try:
        for given, message in enumerate(expected):
            started = time.monotonic()
            done = subprocess.run([*prefix, sys.executable, "-m", "pipeline", *data, *moved[:given]], cwd=here,
                                  env=environment(), capture_output=True, text=True, timeout=300)
            printed = (done.stdout + done.stderr).strip()
            assert done.returncode == 1 and printed.startswith(message) and "\n" not in printed, output(done)
            assert time.monotonic() - started < 60
        assert not any(here.iterdir()) and [f.name for f in elsewhere.iterdir()] == ["out"]  # (Hydra's, as always)
    finally:
        here.chmod(0o755)


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast(tiny_archive, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path, made_store=False) if not o.startswith("tracking.uri")]
    start = time.monotonic()
    done = pipeline_command(tmp_path, *overrides, f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert (done.stderr + done.stdout).count("cannot reach the tracking server") == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert time.monotonic() - start < 60
    assert not (tmp_path / "cache").exists()  # no data was read


# -- faults: nothing lost, nothing left dangling -------------------------------------------------------
def test_exception_in_a_callback_ends_failed_with_finished_epochs_recorded(tiny_config, monkeypatch):
    import keras

    class Bomb(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("callback exploded")

    original = fit.fit
    monkeypatch.setattr(fit, "fit", lambda model, data, cfg, seed, callbacks=(): original(
        model, data, cfg, seed, callbacks=[*callbacks, Bomb()]))
    with pytest.raises(RuntimeError, match="callback exploded"):
        train(tiny_config)
    frame = runs(tiny_config.tracking.uri)
    assert frame["status"].tolist() == ["FAILED"]
    assert "callback exploded" in frame["tags.error"][0]
    assert float(frame["tags.seconds.fit"][0]) > 0  # how long the fit ran before it failed
    history = MlflowClient(tiny_config.tracking.uri).get_metric_history(frame.run_id[0], "val_loss")
    assert [p.step for p in history] == [1, 2]


def process_state() -> dict:
    """What a notebook user could notice of a library they called, besides its numbers (next_numbers): signal
    handlers, hooks, standard error, the collector, the environment, threads, descriptors; the plotting backend,
    its settings and open figures; MLflow's tracking URI, the experiment the next run goes to, the active run."""
    import gc
    import os
    import threading

    import matplotlib
    from matplotlib import pyplot as plt
    from mlflow.tracking import fluent

    return {"handlers": {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)},
            "unraisablehook": sys.unraisablehook, "stderr": (sys.stderr, os.readlink("/proc/self/fd/2")),
            "gc": (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()), "environment": dict(os.environ),
            # (MLflow's artifact repositories are cached per run with their thread pools: MLflow's, like its connections)
            "threads": sorted(t.name for t in threading.enumerate() if not t.name.startswith("MlflowLocalArtifact")),
            "descriptors": sorted(os.listdir("/proc/self/fd")),
            "plotting": (matplotlib.get_backend(), matplotlib.is_interactive(), dict(matplotlib.rcParams),
                         plt.get_fignums()),
            "mlflow": (mlflow.get_tracking_uri(), fluent._get_experiment_id(), mlflow.active_run())}


def next_numbers() -> dict:
    """The next number of each random generator a notebook draws from (drawing it moves the generator on)."""
    import random

    import keras
    import numpy as np
    import tensorflow as tf

    return {"random": random.random(), "numpy": float(np.random.rand()), "numpy.normal": float(np.random.normal()),
            "tensorflow": float(tf.random.uniform([])), "keras": float(keras.random.uniform(()))}


def test_train_in_a_program_changes_nothing_global_and_a_keyboard_interrupt_ends_it_killed(tiny_archive, tmp_path,
                                                                                            monkeypatch):
    """train(cfg) from a notebook or another program: no signal handler, hook, descriptor, collector setting,
    environment variable, thread, plotting backend or figure of its own stays behind, the notebook's random
    generators go on as if it had not run and its MLflow settings are as it left them, and a KeyboardInterrupt
    (here from a callback, as from a notebook's stop button) ends the run KILLED with every finished epoch."""
    import keras
    import matplotlib
    from mlflow.tracking import _tracking_service, fluent

    from pipeline.config import configure

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created_store(uri)  # (MLflow keeps a store's connections open once it has used it: not ours to close)
    keras.layers.Dense(1)  # TensorFlow and Keras loaded, as a notebook would have them
    # the notebook's own choices: a plotting backend, a tracking store and experiment, seeded generators
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):  # (all put back for the tests after this one)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", _tracking_service.utils._tracking_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    created_store(notebook := f"sqlite:///{tmp_path / 'notebook.db'}").create_experiment("earlier")
    mlflow.set_tracking_uri(notebook)
    mlflow.set_experiment("notebook")  # (its id, 2, is not the run's experiment's)
    cfg = configure(*tiny_overrides(tiny_archive, tmp_path), "fit.jit_compile=true", "fit.epochs=5")
    keras.utils.set_random_seed(7)
    try:
        found, _ = process_state(), next_numbers()
        called = time.time()
        with mlflow.start_run(run_name="the notebook's own") as own:  # a run of its own, open around train()
            train(cfg)
            assert mlflow.active_run().info.run_id == own.info.run_id  # (still its own, still open)
        left, drawn = process_state(), next_numbers()
        keras.utils.set_random_seed(7)
        next_numbers()
        assert drawn == next_numbers()  # each generator's second number, as without train() between
        assert {key: value for key, value in left.items() if key != "descriptors"} == {
            key: value for key, value in found.items() if key != "descriptors"}
        assert left["mlflow"][:2] == (notebook, "2") and left["plotting"][0] == "svg"  # (what the test set up)

        class Stop(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 2:
                    raise KeyboardInterrupt

        original = fit.fit
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fit, "fit", lambda model, data, cfg, seed, callbacks=(): original(
                model, data, cfg, seed, callbacks=[*callbacks, Stop()]))
            with pytest.raises(KeyboardInterrupt):
                train(cfg)
        assert process_state() == left  # (a second call opens no descriptor either)
    finally:
        matplotlib.use(backend)
    frame = runs(uri)
    assert frame["status"].tolist() == ["FINISHED", "KILLED"]
    assert MlflowClient(uri).get_run(frame.run_id[0]).info.start_time >= int(called * 1000)  # not when imported
    steps = [point.step for point in MlflowClient(uri).get_metric_history(frame.run_id[1], "val_loss")]
    assert steps == [1, 2, 3]
    notebook_store = MlflowClient(notebook)  # nothing went to the notebook's own store but its own run
    ran = notebook_store.search_runs([e.experiment_id for e in notebook_store.search_experiments()])
    assert [(each.info.run_name, each.info.status) for each in ran] == [("the notebook's own", "FINISHED")]
    assert "mlflow.parentRunId" not in MlflowClient(uri).get_run(frame.run_id[0]).data.tags  # (its parent: another store's)


@pytest.mark.slow
def test_a_signal_while_a_finished_run_is_recorded_still_stops_the_program(tiny_config, monkeypatch):
    from pipeline import tracking

    record_end = mlflow.MlflowClient.set_terminated

    def end_run_interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the run's end is being written
        return record_end(*args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", end_run_interrupted)
    with pytest.raises(KeyboardInterrupt), SIGNALS.installed():  # as python -m pipeline sets the process up
        with tracking.TrackedRun(tiny_config):
            pass
    assert runs(tiny_config.tracking.uri)["status"].tolist() == ["FINISHED"]  # its end was recorded


@pytest.mark.slow
def test_runs_started_together_into_a_new_store_both_finish(tiny_archive, tmp_path):
    # Each creates the store on first use; MLflow's migration of a new SQLite file is not safe twice at once.
    overrides = tiny_overrides(tiny_archive, tmp_path, made_store=False) + ["evaluate.log_model=false"]
    together = [subprocess.Popen([sys.executable, "-m", "pipeline", *overrides, f"build.hidden_units={units}",
                                  f"hydra.run.dir={tmp_path / str(units)}"], cwd=tmp_path, env=environment(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for units in (4, 8)]
    for process in together:
        log, _ = process.communicate(timeout=600)
        assert process.returncode == 0, log[-3000:]
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(frame["params.build.hidden_units"]) == ["4", "8"] and set(frame["status"]) == {"FINISHED"}


@pytest.mark.slow
def test_a_ctrl_c_whose_handler_runs_in_a_finalizer_still_stops_the_run(tiny_config):
    from pipeline import tracking

    class Finalized:  # as the garbage collector runs finalizers and weakref callbacks, at any moment
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler raises here, where Python drops exceptions

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), SIGNALS.installed():
        with tracking.TrackedRun(tiny_config):
            Finalized()
            time.sleep(30)  # the run's work goes on; the Ctrl-C must still stop it
    assert time.monotonic() - started < 10
    assert runs(tiny_config.tracking.uri)["status"].tolist() == ["KILLED"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, converted", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-made-an-error"])
def test_a_signal_whose_exception_is_lost_is_sent_again_until_the_run_ends(tiny_config, signum, converted):
    from pipeline import tracking

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), SIGNALS.installed():
        with tracking.TrackedRun(tiny_config):
            try:
                signal.raise_signal(signum)  # the handler raises here ...
            except KeyboardInterrupt:
                if converted:  # ... and C code turns the exception into an error of its own (pydantic does)
                    raise ValueError("Error building validator: Interrupted: SIGINT") from None
                # ... or clears it, as C code calling back into Python can
            time.sleep(30)  # training goes on; the signal must still stop it
    assert time.monotonic() - started < 10
    assert runs(tiny_config.tracking.uri)["status"].tolist() == ["KILLED"]
    with SIGNALS.installed():
        time.sleep(3 * SIGNALS.REDELIVERY)  # the run ended on it: it is not sent again


@pytest.mark.slow
def test_a_resume_asking_other_settings_is_refused_and_jobs_run_with_other_settings_run_again(tiny_archive, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "pipeline", "-m", *tiny_overrides(tiny_archive, tmp_path), "fit.epochs=2",
            f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    first = subprocess.run(args + ["build.hidden_units=4,8"], cwd=tmp_path, env=environment(), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, output(first)
    parent, children = sweep_runs(uri)
    resumed = f"sweep.resume={parent.info.run_id}"
    # other axes: refused before any write, the parent as it was
    refused = subprocess.run(args + ["build.hidden_units=4,16", resumed], cwd=tmp_path, env=environment(),
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, output(refused)
    assert "the axis build.hidden_units: 4,8 in the sweep, 4,16 now" in refused.stdout + refused.stderr
    assert "Changing param values is not allowed" not in refused.stdout + refused.stderr
    after, children_after = sweep_runs(uri)
    assert (after.info.status, after.info.end_time, after.data.params) == (
        "FINISHED", parent.info.end_time, parent.data.params)
    assert {c.info.run_id for c in children_after} == {c.info.run_id for c in children}
    # A parent made before sweeps kept their settings (sweep/settings.json) lets the resume through: then
    # each job's own recorded settings decide, and the jobs that ran 2 epochs run again for 3.
    settings = Path(urllib.parse.urlparse(parent.info.artifact_uri).path) / "sweep" / "settings.json"
    settings.unlink()
    again = subprocess.run(args + ["build.hidden_units=4,8", "fit.epochs=3", resumed], cwd=tmp_path,
                           env=environment(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, output(again)
    for child in children:
        assert (f"sweep job {child.info.run_name} finished before as run {child.info.run_id} with other settings "
                "(fit.epochs: 2 then, 3 now): it runs again") in again.stdout + again.stderr, output(again)
    parent, children = sweep_runs(uri)
    latest = {c.info.run_name: c for c in sorted(children, key=lambda c: c.info.start_time)}
    assert len(children) == 4 and {c.data.params["fit.epochs"] for c in latest.values()} == {"3"}
    table = pd.read_csv(MlflowClient(uri).download_artifacts(parent.info.run_id, "analysis/jobs.csv", str(tmp_path)))
    assert set(table.run_id) == {c.info.run_id for c in latest.values()}


@pytest.mark.slow
def test_parallel_jobs_writing_to_the_embedded_store_lose_nothing(tiny_archive, tmp_path):
    done = multirun(tmp_path, tiny_archive, "build.hidden_units=4,8,12", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=3", "sweep.threads=1", new_store=True)
    assert done.returncode == 0, output(done)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, children = sweep_runs(uri)
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["pipeline.training"] for c in children}) == 3  # a training per setting, on joblib's workers
    for stage in ("ingest", "vectorize"):  # on a cold cache: the sweep's data worker made it once, every job read it
        assert {c.data.tags[f"cache.{stage}"] for c in children} == {"hit"}, stage
        assert len(list((tmp_path / "cache" / stage).iterdir())) == 1, stage
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    for child in children:
        assert_every_epoch_recorded(client, child.info.run_id, int(child.data.params["fit.epochs"]))
        paths = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"history.csv", "model_summary.txt", "config", "figures"} <= paths
        training = [i for i in child.inputs.dataset_inputs
                    if {t.key: t.value for t in i.tags}.get("mlflow.data.context") == "training"]
        assert [i.dataset.name for i in training] == ["imdb-reviews"]
        assert mlflow.pyfunc.load_model(child.data.tags["model_uri"]).predict(["fine"]).shape == (1,)


def test_a_data_set_registered_by_another_job_at_the_same_moment_is_linked_not_fatal(tiny_config, monkeypatch):
    """A tracking server's SQL store checks for a data set's row, then inserts it: two jobs of a parallel
    sweep registering the same data at once make it refuse the second insert. Here every data set's first
    registration loses that race, as it did on a team server."""
    from mlflow.exceptions import RestException

    original = MlflowClient.log_inputs
    refused = []

    def racing(self, run_id, datasets=None, *args, **kwargs):
        for item in datasets or []:
            key = (item.dataset.name, item.dataset.digest)
            if key not in refused:
                refused.append(key)
                raise RestException({"error_code": "BAD_REQUEST", "message": (
                    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                    "datasets.name, datasets.digest")})
        return original(self, run_id, datasets, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    train(tiny_config)
    (run,) = [mlflow.get_run(r) for r in runs(tiny_config.tracking.uri).run_id]
    assert run.info.status == "FINISHED"
    contexts = sorted({t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs)
    assert contexts == ["training"] and len(refused) == 1
    assert "test_f1_score" in run.data.metrics  # the run went on after the data set was linked


def test_cache_entries_are_keyed_by_code(tmp_path):
    module = types.SimpleNamespace(__file__=str(tmp_path / "stage.py"))
    Path(module.__file__).write_text("def stage(): return 1\n")
    before = cache.make_key("ingest", {"a": 1}, [module])
    Path(module.__file__).write_text("def stage(): return 2\n")
    assert cache.make_key("ingest", {"a": 1}, [module]) != before
    assert cache.make_key("ingest", {"a": 2}, [module]) != cache.make_key("ingest", {"a": 1}, [module])


@pytest.mark.parametrize("write_later", [False, True])
def test_jobs_side_by_side_that_miss_one_cache_entry_make_it_once(tiny_archive, tmp_path, write_later):
    """Two jobs of a parallel sweep on a cold cache (processes there; threads here, each with its own lock file
    handle, as processes have): the first makes the data, the second waits for it and reads it. `write_later`: the
    first makes it as a data worker does (prepare_ahead), writing the entry after its stage returned: the second
    still waits, for the entry's write."""
    import threading

    from pipeline import ingest
    from pipeline.steps import Steps

    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path))
    made, products, events = [], {}, []

    def slowly(*args):
        made.append(threading.current_thread().name)
        time.sleep(1.0)  # the other job asks for the entry meanwhile
        return ingest.ingest(*args)

    def job(name):
        step = Steps(cfg, cache.StageCache(cfg), tell=False, write_later=write_later and name == "first")
        products[name] = (step("ingest", slowly, cfg.ingest, cfg.seed), step.cache["ingest"])
        if step.unwritten:  # (the data handed over meanwhile, in a worker)
            time.sleep(0.5)
            step.write_kept()
        events.append(name)

    jobs = [threading.Thread(target=job, args=(name,), name=name) for name in ("first", "second")]
    jobs[0].start()
    time.sleep(0.2)
    jobs[1].start()
    for each in jobs:
        each.join(timeout=60)
    assert made == ["first"] and products["first"][1] == "miss" and products["second"][1] == "hit"
    assert events == ["first", "second"]
    first, second = products["first"][0], products["second"][0]
    assert second.digest == first.digest and second.frame["text"].tolist() == first.frame["text"].tolist()


def test_big_arrays_come_back_from_the_data_worker_through_files_that_no_run_leaves_behind(tmp_path):
    """prepare_ahead hands arrays over SPILL back through files in cache_dir: read back equal, and the files gone
    when the run took them, when it ended before taking them, and (at the next run) when it was killed outright.
    The worker writes the stage cache's entry after the handover: the run has its data first, the entry is whole
    once the run's end waited for it (or the run failed after taking its data), and a run that ends first leaves
    no entry and no lock held."""
    import numpy as np
    from filelock import FileLock

    from pipeline.speed import prepare_ahead
    from pipeline.steps import Steps
    from tests.handover import GatedCache, arrays, big_data

    killed = tmp_path / f"{prepare_ahead.PREFIX}999999999-a"  # (no such process)
    killed.mkdir()
    (killed / "x_train.npy").write_bytes(b"left by a run killed outright")
    cfg = compose_config([f"cache_dir={tmp_path}"])
    expected, store = arrays(), GatedCache(cfg)

    def same(got) -> bool:
        return all(np.array_equal(getattr(got, name), getattr(expected, name)) for name in expected.ARRAYS)

    for taken in (False, True, "then failed"):
        step = Steps(cfg, store, tell=False)
        try:
            with prepare_ahead.started(cfg, big_data, step) as prepared:
                if taken:
                    assert same(prepared().encoded) and store.load("vectorize") is None  # the data before the entry
                    (tmp_path / GatedCache.TAKEN).touch()  # (the worker's write may go on)
                    if taken == "then failed":  # (fit or evaluate failing: the data made is kept all the same)
                        raise ArithmeticError("the run failed after taking its data")
                    prepared.written()
                    assert step.seconds["cache_write"] > 0  # its seconds kept
                else:  # the worker's files written, the run ending first (an error, Ctrl-C as TensorFlow loads)
                    deadline = time.monotonic() + 60
                    while not list(tmp_path.glob(f"{prepare_ahead.PREFIX}*/y_test.npy")) and time.monotonic() < deadline:
                        time.sleep(0.1)
        except ArithmeticError:
            assert taken == "then failed"
        if taken:
            assert same(store.load("vectorize")), taken  # whole
            shutil.rmtree(tmp_path / "vectorize")
            (tmp_path / GatedCache.TAKEN).unlink()
        assert not list(tmp_path.glob(f"{prepare_ahead.PREFIX}*")), taken
        if not taken:  # no entry, no unfinished copy, and the entry's lock let go with the stopped worker
            assert store.load("vectorize") is None and not list((tmp_path / "vectorize").glob("*"))
            with FileLock(tmp_path / ".locks" / "vectorize-handover.lock", timeout=5):
                pass


def test_a_sweep_that_ends_while_its_data_worker_works_ends_at_once_and_stops_it(tiny_archive, tmp_path):
    """A sweep's data worker (prepare_ahead.warming) still making data when the process ends (an interrupted sweep's
    driver) is stopped then: the process does not wait for it (multiprocessing's own handler would, to the end)."""
    script = ("from pipeline.speed import prepare_ahead; from tests.conftest import compose_config; "
              "from tests.handover import slow_data; "
              f"prepare_ahead.warming(compose_config({tiny_overrides(tiny_archive, tmp_path)!r}), slow_data); "
              "print('started', flush=True)")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr
    assert time.monotonic() - began < 30  # (the worker sleeps a minute)


def test_truncated_cache_entry_is_rebuilt_not_used(tmp_path):
    import numpy as np

    store = cache.StageCache(compose_config([f"cache_dir={tmp_path}"]))
    store.write("vectorize", "k", {"x": np.arange(1000)}, {"m": 1})
    file = tmp_path / "vectorize" / "k" / "x.npy"
    file.write_bytes(file.read_bytes()[:-100])
    assert store.read("vectorize", "k") is None
    assert not (tmp_path / "vectorize" / "k").exists()


def test_a_sweeps_next_job_gets_the_entry_read_before_until_it_changes(tmp_path, monkeypatch):
    """Under the command line the last entry read of a stage is given again, read-only, while its manifest is the same
    file; a rebuilt entry is read anew, and a damaged one is still found damaged."""
    import numpy as np

    import pipeline

    monkeypatch.setattr(pipeline, "COMMAND_LINE", True)
    monkeypatch.setattr(cache, "LAST", {})
    store = cache.StageCache(compose_config([f"cache_dir={tmp_path}"]))
    store.write("ingest", "k", {"reviews": pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})}, {"m": [1]})
    store.write("vectorize", "k", {"x": np.arange(1000)}, {"m": 1})
    first, again = store.read("vectorize", "k"), store.read("vectorize", "k")
    assert again[0]["x"] is first[0]["x"] and not again[0]["x"].flags.writeable and again[1] == {"m": 1}
    frame, meta = store.read("ingest", "k")
    frame["reviews"]["label"] = [5, 5]  # (a job's own copy: the next one gets the entry as read)
    meta["m"].append(2)
    frame, meta = store.read("ingest", "k")
    assert frame["reviews"]["label"].tolist() == [0, 1] and meta == {"m": [1]}
    shutil.rmtree(tmp_path / "vectorize" / "k")
    store.write("vectorize", "k", {"x": np.arange(5)}, {"m": 2})  # rebuilt: read anew
    assert store.read("vectorize", "k")[0]["x"].tolist() == list(range(5))
    file = tmp_path / "vectorize" / "k" / "x.npy"
    file.write_bytes(file.read_bytes()[:-10])
    (tmp_path / "vectorize" / "k" / cache.MANIFEST).touch()  # (damaged, as anything that rewrites it would)
    assert store.read("vectorize", "k") is None


# -- reproducibility (the same numbers cold and warm: tests/test_entrypoints.py::test_python_m_pipeline) --
def test_a_run_records_what_is_needed_to_repeat_it(tiny_run):
    tiny_config, _, _ = tiny_run
    frame = runs(tiny_config.tracking.uri)
    run = frame.iloc[0]
    assert len(run["tags.git.commit"]) == 40 and run["tags.git.dirty"] in ("True", "False")
    assert len(run["tags.data.digest"]) == 64
    for package in ("tensorflow", "keras", "mlflow", "hydra-core", "numpy"):
        assert run[f"tags.version.{package}"][0].isdigit()
    folder = Path(tiny_config.cache_dir).parent / "past"
    MlflowClient(tiny_config.tracking.uri).download_artifacts(run.run_id, "config/config.yaml", str(folder))
    # what the README says: python -m pipeline --config-path past --config-name config
    from hydra import compose, initialize_config_dir

    from pipeline import config

    with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        assert config.load(compose(config_name="config")) == tiny_config


# -- security ------------------------------------------------------------------------------------------
def test_no_secret_reaches_params_tags_or_artifacts(tiny_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-env-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "planted-password")
    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + [
        "ingest.url=https://reader:planted-url-secret@data.example.invalid/aclImdb_v1.tar.gz"])
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(runs(cfg.tracking.uri).run_id[0])
    assert run.data.params["ingest.url"] == "https://***@data.example.invalid/aclImdb_v1.tar.gz"
    recorded = [str(run.data.params), str(run.data.tags), str(run.inputs)]
    download = tmp_path / "artifacts"
    client.download_artifacts(run.info.run_id, "", str(download))
    model = Path(mlflow.artifacts.download_artifacts(run.data.tags["model_uri"], dst_path=str(tmp_path / "model")))
    for file in [*download.rglob("*"), *model.rglob("*")]:
        if file.is_file():
            recorded.append(file.read_bytes().decode("utf-8", errors="ignore"))
    text = "\n".join(recorded)
    for secret in ("planted-env-secret", "planted-password", "planted-url-secret"):
        assert secret not in text, secret


def test_loading_a_model_refuses_code_from_the_file(tmp_path):
    import keras

    from pipeline import textmodel

    inputs = keras.Input(shape=(4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "classifier.keras")
    textmodel.save_vocabulary(tmp_path / "vocabulary.json", ["", "[UNK]", "a"], 4, "pre")
    context = types.SimpleNamespace(artifacts={"classifier": str(tmp_path / "classifier.keras"),
                                               "vocabulary": str(tmp_path / "vocabulary.json")})
    with pytest.raises(ValueError, match="(?i)safe"):
        textmodel.RawTextModel().load_context(context)
