"""The real entry points, as a user starts them, on a tiny archive, into a temporary tracking store."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT, review, tiny_overrides
from tests.helpers import check_complete_run, created_store, environment, output, post, runs

pytestmark = pytest.mark.slow


def test_python_m_pipeline(tiny_archive, tmp_path):
    overrides = tiny_overrides(tiny_archive, tmp_path) + ["build.hidden_units=8", f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, output(done)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    frame = runs(uri)
    assert len(frame) == 1 and frame["params.build.hidden_units"][0] == "8"
    check_complete_run(uri, frame.run_id[0], epochs=3)
    composed = MlflowClient(uri).download_artifacts(frame.run_id[0], "config/config.yaml", str(tmp_path))
    assert "hidden_units: 8" in Path(composed).read_text()
    # the last line the run logs says how it ended and what it scored, as the store has it
    assert (f"MLflow run {frame.run_id[0]} ended FINISHED, test_accuracy {frame['metrics.test_accuracy'][0]:.4g}, "
            f"test_loss {frame['metrics.test_loss'][0]:.4g}") in done.stdout
    # the data was prepared in a worker process while TensorFlow loaded; a second run reuses it
    assert "in a worker process while TensorFlow loads" in done.stdout  # Hydra logs to stdout
    assert frame["tags.cache.vectorize"][0] == "miss" and float(frame["tags.seconds.vectorize"][0]) >= 0
    # the worker writes the stage cache after handing the data over; the run waited for it and kept its seconds
    assert float(frame["tags.seconds.cache_write"][0]) >= 0  # (kept to the hundredth)
    assert [len(list((tmp_path / "cache" / stage).glob("*/manifest.json"))) for stage in ("ingest", "vectorize")] == [1, 1]
    again = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=tmp_path, env=environment(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, output(again)
    for stage in ("ingest", "vectorize"):
        assert re.search(rf"^{stage} +\d+\.\d s  .*, from the stage cache$", again.stdout, re.MULTILINE), stage
    # the same config and seed, cold then warm: the same curves and test metrics
    both = runs(uri)
    assert both["tags.cache.vectorize"].tolist() == ["miss", "hit"]
    client = MlflowClient(uri)
    for curve in ("loss", "accuracy", "val_loss", "val_accuracy"):
        first, second = ([(p.step, p.value) for p in sorted(client.get_metric_history(r, curve), key=lambda p: p.step)]
                         for r in both.run_id)
        assert first == second, curve
    assert both["metrics.test_accuracy"][0] == both["metrics.test_accuracy"][1]
    assert both["metrics.test_loss"][0] == both["metrics.test_loss"][1]


def test_the_readmes_own_reviews_command_on_a_table_of_3000_reviews(tmp_path):
    """The README's command, as written there, on a CSV of 3,000 reviews: a table holds out a share of its
    training split (the tutorial's 10,000 would leave none), and the run is in the store. No tracking.uri
    given: the run goes to the default store, the one `mlflow ui` opens in this folder."""
    section = (PROJECT / "README.md").read_text().split("## Your own reviews", 1)[1]
    command = re.search(r"^python -m pipeline .*?(?<!\\)$", section.replace("\\\n", " "), re.MULTILINE).group(0).split()
    assert "ingest=table" in command and "ingest.path=IMDB_Dataset.csv" in command, command
    rng = random.Random(0)
    pd.DataFrame({"review": [review(rng, i % 2 == 0) for i in range(3000)],
                  "sentiment": ["positive" if i % 2 == 0 else "negative" for i in range(3000)]}).to_csv(
        tmp_path / "IMDB_Dataset.csv", index=False)
    tiny = [o for o in tiny_overrides(tmp_path, tmp_path, made_store=False) if not o.startswith(("ingest.", "split.", "tracking.uri"))]
    done = subprocess.run([sys.executable, *command[1:], *tiny, f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, output(done)
    assert (tmp_path / "mlflow.db").exists()  # `mlflow ui` in this folder opens sqlite:///mlflow.db
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(frame) == 1
    run = frame.iloc[0]
    assert run.status == "FINISHED" and run["params.ingest.source"] == "table"
    assert (run["params.split.validation_fraction"], run["params.split.validation_size"]) == ("0.4", "None")
    rows = [int(run[f"params.data.{part}_rows"]) for part in ("train", "validation", "test")]
    assert rows == [900, 600, 1500]  # half the rows are the test split, 40% of the other half validation
    assert 0.0 <= run["metrics.test_accuracy"] <= 1.0


LIBRARY_LINES = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|cpu_feature_guard|XLA service|oneDNN|Compiled cluster"
                           r"|INFO mlflow|WARNING mlflow", re.MULTILINE)


def test_the_terminal_shows_stages_epochs_and_result_and_the_run_keeps_the_full_log(tiny_archive, tmp_path):
    overrides = tiny_overrides(tiny_archive, tmp_path, made_store=False) + ["fit.jit_compile=true", f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, output(done)
    terminal = done.stdout + done.stderr
    assert not LIBRARY_LINES.search(terminal), terminal
    for stage, made in [("start TensorFlow", ""), ("ingest", "48 reviews"), ("split", "16 train, 8 validation, 24 test"),
                        ("vectorize", "tokens"), ("build", "parameters"), ("fit", "3 epochs, lowest val_loss"),
                        ("evaluate", "test accuracy"), ("log_model", "raw-text model")]:
        assert re.search(rf"^{stage} +\d+\.\d s" + (f"  .*{made}" if made else "$"), done.stdout, re.MULTILINE), stage
    assert [line for line in done.stdout.splitlines() if line.startswith("Epoch ")] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    verdict, command = done.stdout.strip().splitlines()[-4:-2]  # then the run page's and the runs table's URLs
    assert "ended FINISHED, test_accuracy" in verdict and command.startswith("See it: mlflow ui --backend-store-uri")
    run_id = runs(f"sqlite:///{tmp_path / 'mlflow.db'}").run_id[0]
    full = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(run_id, "logs/run.log", str(tmp_path))
    kept = Path(full).read_text()
    assert "Compiled cluster using XLA" in kept and "Creating initial MLflow database tables" in kept
    assert "[pipeline][INFO] - fit" in kept  # the pipeline's own lines too, with their times
    loud = subprocess.run([sys.executable, "-m", "pipeline", *overrides, "verbose=true"], cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0, output(loud)
    assert "Compiled cluster using XLA" in loud.stderr and "INFO mlflow" in loud.stderr


def test_a_failure_while_preparing_in_the_worker_fails_the_run(tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b" + b"not really gzip" * 100)
    overrides = tiny_overrides(broken, tmp_path) + [f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "in a worker process while TensorFlow loads" in done.stdout
    assert "not a readable .tar.gz archive" in done.stdout + done.stderr
    frame = runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert frame["status"].tolist() == ["FAILED"]
    assert "not a readable .tar.gz archive" in frame["tags.error"][0]


def test_mlflow_run_local_env(tiny_archive, tmp_path):
    """`mlflow run . --env-manager local` as the README writes it, no experiment named: the run lands in
    imdb-sentiment with every other run, and the run `mlflow run` made in Default points to it."""
    from pipeline.tracking.projects import project_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides(tiny_archive, tmp_path, made_store=False) if not o.startswith("tracking.uri")]
    overrides += ["fit.epochs=2", f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(PROJECT), "--env-manager", "local",
         "-P", "overrides=" + " ".join(overrides)],
        cwd=tmp_path, env=environment(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, output(done)
    frame = runs(uri)
    assert len(frame) == 1  # the job's run, with the project's tags
    assert frame["tags.mlflow.project.entryPoint"][0] == "main" and frame["tags.mlflow.source.type"][0] == "PROJECT"
    check_complete_run(uri, frame.run_id[0], epochs=2)
    experiment_id = MlflowClient(uri).get_experiment_by_name("imdb-sentiment").experiment_id
    assert f"/#/experiments/{experiment_id}/runs/{frame.run_id[0]}" in done.stdout  # the link it prints
    (pointer,) = MlflowClient(uri).search_runs(["0"])  # what `mlflow run` made, and ended, in Default
    assert pointer.info.run_id == frame["tags.pipeline.project_run"][0] in done.stderr  # ("Run (ID '...') succeeded")
    assert pointer.data.tags["pipeline.recorded_as"] == frame.run_id[0] and pointer.info.status == "FINISHED"
    assert frame.run_id[0] in pointer.data.tags["mlflow.note.content"] and not pointer.data.metrics
    # an experiment the user chose (`mlflow run --experiment-name`, MLFLOW_EXPERIMENT_NAME) keeps its run, and
    # so does Default when the settings ask for it (tracking.experiment_name=Default)
    client = MlflowClient(uri)
    chosen = client.create_run(client.create_experiment("mine")).info.run_id
    assert project_run(client, chosen, "imdb-sentiment", None, time.time()).info.run_id == chosen
    asked = client.create_run("0").info.run_id
    assert project_run(client, asked, "Default", None, time.time()).info.run_id == asked
    assert len(runs(uri)) == 1 and len(client.search_runs(["0"])) == 2


FINISHED_EPOCH = re.compile(r"^\d+/\d+ - .*val_loss: ", re.MULTILINE)  # Keras's line for an epoch that ended


def _start_training(tiny_archive, folder: Path) -> tuple[subprocess.Popen, MlflowClient, str, Path]:
    """`python -m pipeline` training for a very long time into a store of its own in `folder`: the process, a
    client of its store, the store's URI and the file that holds what it printed (unbuffered, as on a terminal)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    overrides = tiny_overrides(tiny_archive, folder) + ["fit.epochs=100000", f"hydra.run.dir={folder / 'out'}"]
    client = created_store(uri)
    printed = folder / "printed.txt"
    (folder / "tmp").mkdir()  # its temporary files: none may be left behind, however it ends
    with open(printed, "w") as terminal:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *overrides], cwd=folder, stdout=terminal,
                                   env=environment(PYTHONUNBUFFERED="1", TMPDIR=str(folder / "tmp")),
                                   stderr=subprocess.STDOUT)
    return process, client, uri, printed


def _three_epochs_in(process: subprocess.Popen, client: MlflowClient, uri: str, printed: Path) -> str:
    """The run's id, once it has recorded 3 epochs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(1)
        frame = runs(uri) if client.get_experiment_by_name("imdb-sentiment") else []
        if len(frame) and len(client.get_metric_history(frame.run_id[0], "val_loss")) >= 3:
            return frame.run_id[0]
        assert process.poll() is None, printed.read_text()[-3000:]
    raise AssertionError("no 3 epochs recorded in 300 s")


def _recorded_epochs(client: MlflowClient, run_id: str) -> list:
    """The run's val_loss points, one per epoch, in order 1..N."""
    points = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda point: point.step)
    assert len(points) >= 3 and [point.step for point in points] == list(range(1, len(points) + 1))
    return points


def test_a_run_stopped_mid_fit_by_ctrl_c_sigterm_or_sigkill_ends_killed_with_its_finished_epochs(tiny_archive,
                                                                                                 tmp_path):
    """Three runs training at once, each in a folder and store of its own, each stopped once it has recorded 3
    epochs: by Ctrl-C, by SIGTERM, and killed outright (SIGKILL)."""
    ways = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
    started = {}
    try:
        for way in ways:
            (tmp_path / way).mkdir()
            started[way] = _start_training(tiny_archive, tmp_path / way)
        stopped = {}
        for way, signum in ways.items():
            process, client, uri, printed = started[way]
            run_id = _three_epochs_in(process, client, uri, printed)
            process.send_signal(signum)
            stopped[way] = run_id, time.time()
            process.wait(timeout=120)
    finally:
        for process, *_ in started.values():
            if process.poll() is None:
                process.kill()

    for way in ("ctrl-c", "sigterm"):  # the process records how it ended
        signum, (process, client, _, printed), (run_id, _) = ways[way], started[way], stopped[way]
        shown = printed.read_text()
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", shown[-3000:]
        kept = len(_recorded_epochs(client, run_id))
        reported = len(FINISHED_EPOCH.findall(shown))  # every epoch the terminal printed is kept (at most one more: in flight)
        assert reported >= 3 and reported <= kept <= reported + 1, (way, reported, kept)
        assert run.info.end_time >= _recorded_epochs(client, run_id)[-1].timestamp
        # one line says how it ended, and nothing follows it: no traceback; the exit status is the shell's for the signal
        assert shown.rstrip().splitlines()[-1] == (
            f"MLflow run {run_id} ended KILLED ({signal.Signals(signum).name}), {kept} epochs kept"), shown[-3000:]
        assert "Traceback" not in shown
        assert process.returncode == 128 + signum

    # SIGKILL gives the process no chance to record anything: its watchdog process sees it go, writes the
    # epochs the store lacks (each was told to it before Keras printed it) and ends the run when it was last alive.
    (process, client, _, printed), (run_id, killed) = started["sigkill"], stopped["sigkill"]
    deadline = time.monotonic() + 120
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "ended before it ended the run" in run.data.tags["error"]
    points = _recorded_epochs(client, run_id)
    shown = len(FINISHED_EPOCH.findall(printed.read_text()))
    assert shown >= 3 and len(points) >= shown  # every epoch the terminal printed (and the one in flight, if told)
    # the end is the last moment the process was known alive, its last epoch, not when the watchdog noticed
    assert points[-1].timestamp <= run.info.end_time <= killed * 1000
    for way in ways:  # the process's log (each run keeps its part as logs/run.log) has no name to leave behind
        assert not list((tmp_path / way / "tmp").glob("pipeline-*.log")), way


def test_logged_model_is_served_over_rest(tiny_archive, tmp_path):
    from pipeline.train import train
    from tests.conftest import compose_config
    from tests.servers import model_server

    cfg = compose_config(tiny_overrides(tiny_archive, tmp_path) + ["fit.epochs=15", "build.learning_rate=0.02"])
    train(cfg)
    model_uri = runs(cfg.tracking.uri)["tags.model_uri"][0]
    texts = ["Superb, brilliant and moving.", "Awful, boring, the worst.", "A film."]
    with model_server(model_uri, tmp_path, cfg.tracking.uri) as url:
        answers = [post(url, {"inputs": texts}),
                   post(url, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}),
                   post(url, {"dataframe_records": [{"text": t} for t in texts]}),
                   # the column `text` by name, whatever comes before or after it (docs/serving.md)
                   post(url, {"dataframe_records": [{"extra": "zzz", "text": t} for t in texts]}),
                   post(url, {"dataframe_split": {"columns": ["id", "text", "stars"], "data": [[1, t, 5] for t in texts]}}),
                   post(url, {"instances": [{"id": 1, "text": t} for t in texts]})]
        # what is not a review is refused 400, naming the first bad input's position and type (docs/serving.md)
        refused = {body: _refusal(url, json.loads(body)) for body in NOT_TEXT}
        assert post(url, {"inputs": texts}) == pytest.approx(answers[0])  # and the server still answers
    for predictions in answers:
        assert len(predictions) == 3 and all(0.0 <= p <= 1.0 for p in predictions)
        assert predictions == pytest.approx(answers[0])
    assert answers[0][0] > answers[0][1]  # the tiny model learned the sentiment words
    for body, (status, message) in refused.items():
        assert status == 400 and NOT_TEXT[body] in message, (body, status, message)


# request bodies that are not text, and what the refusal says of them
NOT_TEXT = {'{"inputs": [null]}': "input 0 (counting from 0) is null, not a review",
            '{"inputs": [123]}': "input 0 (counting from 0) is int 123, not a review",
            '{"inputs": ["A film.", true]}': "input 1 (counting from 0) is bool True, not a review",
            '{"inputs": [{"stars": 5}]}': "input 0 (counting from 0) is int 5, not a review",
            '{"inputs": ["A film.", ["nested", "list"]]}': "input 1 (counting from 0) is list ['nested', 'list']",
            '{"inputs": ["A film.", ""]}': "input 1 (counting from 0) is an empty string, not a review",
            '{"instances": ["A film.", null]}': "input 1 (counting from 0) is null",
            '{"dataframe_split": {"columns": ["text"], "data": [["A film."], [null]]}}': "input 1 (counting from 0) is null",
            '{"dataframe_records": [{"text": 4.5}]}': "input 0 (counting from 0) is float 4.5, not a review",
            '{"dataframe_records": [{"id": 1, "review": "A film."}]}': "no column `text` among the 2 columns sent ('id', "
                                                                      "'review'): name the review's column `text`"}


def _refusal(url: str, body: dict) -> tuple[int, str]:
    """The status and message of a request the server is expected to refuse."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()).get("message", "")


@pytest.mark.parametrize("name, content, message", [
    ("reviews.csv", "id,text\n1,A moving film.\n2,\n3,Dull.\n4,\n",
     "ValueError: reviews.csv: row 2 (counting from 1 after the header) has empty text in column 'text' (2 such rows "
     "in all); write a review there, or remove the row"),
    ("reviews.csv", "id,review\n1,A moving film.\n",
     "ValueError: reviews.csv: no column 'text' (its columns: ['id', 'review']); name the column of reviews with --text-column"),
    ("reviews.jsonl", '{"text": "A moving film."}\n{"text": 5}\n', "ValueError: reviews.jsonl: line 2 has int 5, not text in column 'text'"),
    ("reviews.jsonl", '{"text": "A moving film."}\n{"text": "Dull."\n', "ValueError: reviews.jsonl line 2: not a JSON object"),
    ("reviews.csv", "", "ValueError: reviews.csv is empty"),
    ("missing.csv", None, "FileNotFoundError: missing.csv: no such file")],
    ids=["empty-cell", "missing-column", "a-number", "broken-json-line", "empty-file", "no-file"])
def test_batch_scoring_names_what_is_wrong_with_the_file_in_one_line(tmp_path, name, content, message):
    """Found before the model (or MLflow, or TensorFlow) loads: the file, its row or line, its column and the fix."""
    if content is not None:
        (tmp_path / name).write_text(content)
    done = subprocess.run([sys.executable, "-m", "pipeline.score", "models:/imdb-sentiment@champion", name],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "" and done.stderr.strip().startswith(message), output(done)
    assert len(done.stderr.strip().splitlines()) == 1


def test_batch_scoring_stopped_by_ctrl_c_says_so_in_one_line_and_writes_nothing(tmp_path):
    """Ctrl-C while the model loads (here: from a tracking server that never answers): one line, exit 130, no output."""
    import socket

    (tmp_path / "reviews.txt").write_text("A moving film.\nDull.\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        scoring = subprocess.Popen([sys.executable, "-m", "pipeline.score", "models:/imdb-sentiment@champion", "reviews.txt",
                                    "-o", "scored.csv"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=environment(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{silent.getsockname()[1]}"))
        silent.settimeout(120)
        asked, _ = silent.accept()  # the command is loading the model
        scoring.send_signal(signal.SIGINT)
        printed, said = scoring.communicate(timeout=60)
        asked.close()
    assert scoring.returncode == 130 and printed == "", said
    assert said.strip() == "SIGINT: stopped; scored.csv not written"
    assert [p.name for p in tmp_path.iterdir()] == ["reviews.txt"]
