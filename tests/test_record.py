"""What MLflow shows is what happened: the run's span, each epoch's time, an interrupt at any moment,
the serving check, and the speed switches (each gives the same numbers off as on)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_overrides
from tests.helpers import PROJECT, created_store, environment, output, runs

pytestmark = pytest.mark.slow
FINISHED_EPOCH = re.compile(r"^\d+/\d+ - .*val_loss: ", re.MULTILINE)  # Keras's line for an epoch that ended


def command(tmp_path, archive, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *tiny_overrides(archive, tmp_path), *overrides,
            f"hydra.run.dir={tmp_path / 'out'}"]


def history(client: MlflowClient, run_id: str, key: str):
    return sorted(client.get_metric_history(run_id, key), key=lambda point: point.step)


def test_the_run_spans_the_process_and_each_epoch_carries_the_time_it_ended(tiny_archive, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created_store(uri)  # as a second run would find it
    started = time.time()
    done = subprocess.run(command(tmp_path, tiny_archive, "fit.epochs=40", "fit.loop=keras", "fit.batch_size=2"),
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    wall = time.time() - started
    assert done.returncode == 0, output(done)
    run = MlflowClient(uri).get_run(runs(uri).run_id[0])
    duration = (run.info.end_time - run.info.start_time) / 1000
    # the run spans the process: inside the command's wall time, and short of it only by the interpreter's start
    # and exit (within a second on a quiet machine; a bracket, not a window, so that a loaded one cannot flake)
    assert started <= run.info.start_time / 1000 and run.info.end_time / 1000 <= started + wall
    assert duration >= wall - max(1.0, 0.1 * wall), (duration, wall)

    client = MlflowClient(uri)
    stamps = [point.timestamp / 1000 for point in history(client, run.info.run_id, "val_loss")]
    seconds = [point.value for point in history(client, run.info.run_id, "epoch_seconds")]
    assert len(stamps) == 40 and stamps == sorted(stamps)
    assert run.info.start_time / 1000 <= stamps[0] and stamps[-1] <= run.info.end_time / 1000
    # each epoch is stamped when it ended: an epoch's stamp is taken before the next epoch begins, so the next
    # stamp follows it by at least that epoch's seconds (1 ms: the stamps are whole milliseconds). Stamps that
    # arrived in a burst (taken when written to the store) would follow each other by less.
    assert sum(seconds[1:]) > 0.2  # epochs long enough for a burst to show
    for epoch in range(1, 40):
        assert stamps[epoch] - stamps[epoch - 1] >= seconds[epoch] - 0.001, (epoch + 1, stamps, seconds)
    # and the last is stamped before the model trained on all of them was logged
    model = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
    assert stamps[-1] <= model.creation_timestamp / 1000


@pytest.mark.parametrize("delay, signum", [(1.0, signal.SIGINT), (4.0, signal.SIGINT), (4.0, signal.SIGTERM)],
                         ids=["ctrl-c-at-1s", "ctrl-c-at-4s", "sigterm-at-4s"])
def test_an_interrupt_in_the_first_seconds_stops_at_once_with_one_line(tiny_archive, tmp_path, delay, signum):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created_store(uri)
    process = subprocess.Popen(command(tmp_path, tiny_archive, "fit.epochs=100000"), cwd=tmp_path,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(delay)  # importing, opening the run, reading the data or starting TensorFlow
    process.send_signal(signum)
    sent = time.monotonic()
    try:
        printed, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    acted = time.monotonic() - sent
    assert process.returncode == 128 + signum and "Traceback" not in printed, printed[-3000:]
    name = signal.Signals(signum).name
    frame = runs(uri)
    if frame.empty:  # before the run was open, and so before any data was read: nothing to record
        assert printed.rstrip().splitlines()[-1] == f"{name}: stopped before a run was recorded", printed[-3000:]
        return
    assert frame["status"].tolist() == ["KILLED"], printed[-3000:]
    recorded = len(history(MlflowClient(uri), frame.run_id[0], "val_loss"))
    reported = len(FINISHED_EPOCH.findall(printed))
    # every epoch the terminal reported; an epoch is recorded just before Keras prints it, so an
    # interrupt between the two leaves one more recorded than printed
    assert reported <= recorded <= reported + 1, (recorded, reported)
    assert printed.rstrip().splitlines()[-1] == (
        f"MLflow run {frame.run_id[0]} ended KILLED ({name}), {recorded} epoch{'s' * (recorded != 1)} kept")
    assert acted < 10, acted  # (within a second on a quiet machine; this bound is for a loaded one)


# As a module first loads, a Ctrl-C arrives, and the code that loads it turns the interrupt into an error of its
# own: what pydantic's validator builder does (a SchemaError) while MLflow 3.18 imports its judges' models.
CONVERTING_IMPORT = """
import os, signal, sys, time

class Converting:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
            except KeyboardInterrupt:
                raise ValueError("Error building validator: Interrupted: SIGINT") from None
        return None

sys.meta_path.insert(0, Converting())
"""


@pytest.mark.parametrize("module", ["hydra", "mlflow"])
def test_an_interrupt_that_a_library_turns_into_an_error_still_stops_with_one_line(tiny_archive, tmp_path, module):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CONVERTING_IMPORT.format(module=module))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created_store(uri)
    done = subprocess.run(command(tmp_path, tiny_archive), cwd=tmp_path,
                          env=environment(PYTHONPATH=f"{hook}{os.pathsep}{PROJECT}"), capture_output=True, text=True,
                          timeout=300)
    printed = done.stdout + done.stderr
    assert done.returncode == 130 and "Traceback" not in printed, printed[-3000:]
    assert printed.rstrip().splitlines()[-1] == "SIGINT: stopped before a run was recorded", printed[-3000:]
    assert runs(uri).empty


def test_the_logged_model_passes_mlflows_serving_check(tiny_run, tmp_path):
    """mlflow.models.predict (the check that replaced validate_serving_input in MLflow 3.13) reads the
    request as the scoring server does; env_manager="local": this environment is the model's."""
    from pipeline.tracking.models import INPUT_EXAMPLE

    tiny_config, _, _ = tiny_run
    model_uri = runs(tiny_config.tracking.uri)["tags.model_uri"][0]
    info = mlflow.models.get_model_info(model_uri)
    assert info.saved_input_example_info is not None
    request, answer = tmp_path / "request.json", tmp_path / "answer.json"
    request.write_text(mlflow.models.convert_input_example_to_serving_input(INPUT_EXAMPLE))
    mlflow.models.predict(model_uri, input_path=str(request), content_type="json", output_path=str(answer),
                          env_manager="local")
    predictions = json.loads(answer.read_text())["predictions"]
    assert len(predictions) == len(INPUT_EXAMPLE) and all(0.0 <= p <= 1.0 for p in predictions)


def test_each_speed_switch_gives_the_same_curves_and_test_metrics(tiny_archive, tmp_path):
    """stage_cache is checked in tests/test_train.py and fit.loop in tests/test_stages.py; here the
    switches that act only in a fresh `python -m pipeline`: each run starts cold, in a folder of its own.
    The four runs share nothing, so they run at once (on 2 cores, in about half the time of one by one)."""
    switches = ("default", "prepare_ahead=false", "freeze_gc=false", "fit.compile_cache=false")
    started = {}
    for switch in switches:
        folder = tmp_path / switch.split("=")[0]
        folder.mkdir()
        overrides = ["fit.jit_compile=true", "fit.epochs=4"] + ([switch] if switch != "default" else [])
        started[switch] = folder, subprocess.Popen(command(folder, tiny_archive, *overrides), cwd=folder,
                                                   env=environment(), stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for switch, (folder, process) in started.items():
            printed, complained = process.communicate(timeout=600)
            assert process.returncode == 0, f"{switch}\n{printed[-3000:]}\n{complained[-3000:]}"
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            client, run_id = MlflowClient(uri), runs(uri).run_id[0]
            curves = {key: [point.value for point in history(client, run_id, key)]
                      for key in ("loss", "accuracy", "val_loss", "val_accuracy")}
            tests = {key: value for key, value in client.get_run(run_id).data.metrics.items() if key.startswith("test_")}
            results[switch] = curves, tests
            if switch == "default":
                assert "in a worker process while TensorFlow loads" in printed
                assert list((folder / "cache" / "xla").glob("*/*")), "the default run keeps XLA's programs"
    finally:
        for _, process in started.values():
            if process.poll() is None:
                process.kill()
    for switch, result in results.items():
        assert result == results["default"], switch
