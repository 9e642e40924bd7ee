"""A tracking server lost mid-run loses nothing: the run goes on, its record is kept on disk, and it is written
when the server answers again, or by the one command the run prints last (docs/reliability.md)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_overrides
from tests.helpers import check_complete_run, created_store, environment, free_port, runs
from tests.servers import SERVER_ENV, server_command

LOST = "does not answer"


class Server:
    """`mlflow server` on loopback, stopped and started again on the same port and store."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "Server":
        with open(self.folder / "server.log", "a") as log:  # (a pipe nobody reads could fill and stop it)
            # one worker: uvicorn's supervisor of several restarts a worker slow to answer its health check,
            # which on a busy machine can keep a server from ever answering
            command = server_command(self.folder, self.port)
            command[command.index("--workers") + 1] = "1"
            self.process = subprocess.Popen(command, cwd=self.folder, env=environment(**SERVER_ENV), stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def wait(self) -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=5).close()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer in 300 s"
                time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_run(folder, server: Server, overrides: list[str]) -> subprocess.Popen:
    with open(folder / "run.out", "w") as printed:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *overrides, f"tracking.uri={server.uri}",
                                 f"hydra.run.dir={folder / 'out'}"], cwd=folder, env=environment(),
                                stdout=printed, stderr=subprocess.STDOUT)


def the_run(server: Server):
    """The one run on the server, or None before it exists."""
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("imdb-sentiment")
    found = client.search_runs([experiment.experiment_id]) if experiment else []
    return found[0] if found else None


def epochs_printed(text: str, epochs: int) -> int:
    return len(re.findall(rf"^Epoch \d+/{epochs}$", text, flags=re.MULTILINE))


@pytest.mark.slow
def test_a_lost_tracking_server_loses_nothing(tiny_archive, tmp_path):
    """Two runs at once, each on its own `mlflow server`. (a) The server stopped while the run writes its epochs
    and started again: the run ends FINISHED with every epoch, its test metrics and model, each point once, and
    the terminal said so in one line each way. (b) The server stopped as soon as the run exists (before
    TensorFlow has started) and not started again: training goes on, the process exits non-zero within seconds
    of its end, its last line the command that writes the kept record; once the server is back, that command
    leaves the run FINISHED with every epoch the terminal printed, its params, test metrics, figures, dataset,
    the registered model (loadable) and its true end time; run again, it writes nothing twice."""
    back, gone = tmp_path / "back", tmp_path / "gone"
    for folder in (back, gone):
        folder.mkdir()
    servers = {folder: Server(folder).start() for folder in (back, gone)}
    runs = {}
    try:
        for server in servers.values():
            server.wait()
        common = [o for o in tiny_overrides(tiny_archive, tmp_path) if not o.startswith(("tracking.uri", "fit.epochs"))]
        epochs = {back: 200, gone: 30}  # (a): enough epochs to be training when its server goes (and it waits for it)
        runs[back] = start_run(back, servers[back], common + [f"fit.epochs={epochs[back]}",
                                                               "tracking.wait_for_server=180"])
        runs[gone] = start_run(gone, servers[gone], common + [f"fit.epochs={epochs[gone]}", "tracking.wait_for_server=1",
                                                               "evaluate.registered_model_name=imdb-lost"])
        lost, ended, exited = {}, None, {}
        deadline = time.monotonic() + 600
        while len(exited) < 2 and time.monotonic() < deadline:
            if back not in lost and (run := the_run(servers[back])) is not None and \
                    MlflowClient(servers[back].uri).get_metric_history(run.info.run_id, "val_loss"):
                servers[back].stop()  # mid-fit, then started again at once
                lost[back] = run.info.run_id
                servers[back].start()
            if gone not in lost and (run := the_run(servers[gone])) is not None:
                servers[gone].stop()  # as the run opens: and not back before the run ends
                lost[gone] = run.info.run_id
            if ended is None and "ended FINISHED" in (gone / "run.out").read_text():
                ended = time.monotonic()
            for folder, process in runs.items():
                if folder not in exited and process.poll() is not None:
                    exited[folder] = time.monotonic()
            time.sleep(0.2)
        assert len(exited) == 2, "a run did not end in 10 minutes"
        said = {folder: (folder / "run.out").read_text() for folder in (back, gone)}
        assert len(lost) == 2, said

        # (a) back before the run ended: everything written, FINISHED; the terminal said so, once each way
        assert runs[back].returncode == 0, said[back][-3000:]
        assert said[back].count(LOST) == 1 and said[back].count("answers again:") == 1, said[back][-3000:]
        servers[back].wait()
        mlflow.set_tracking_uri(servers[back].uri)  # (check_complete_run reads the model's info through it)
        check_complete_run(servers[back].uri, lost[back], epochs[back])
        assert not (back / "mlflow-pending" / lost[back]).exists()  # nothing left kept

        # (b) not back: exit 1 within seconds of the run's end, the command last
        last = said[gone].strip().splitlines()[-1]
        assert runs[gone].returncode == 1 and said[gone].count(LOST) == 1, said[gone][-3000:]
        assert exited[gone] - ended < 60  # (wait_for_server=1: the rest is the process ending, on a busy machine)
        command = shlex.split(last)
        assert command[:3] == ["python", "-m", "pipeline.replay"], last
        assert epochs_printed(said[gone], epochs[gone]) == epochs[gone]

        servers[gone].start().wait()
        client = MlflowClient(servers[gone].uri)
        assert client.get_run(lost[gone]).info.status == "RUNNING"  # (what the server held when it went)
        before = int(time.time() * 1000)
        replayed = subprocess.run([sys.executable, *command[1:]], cwd=gone, env=environment(), capture_output=True,
                                  text=True, timeout=600)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        mlflow.set_tracking_uri(servers[gone].uri)
        check_complete_run(servers[gone].uri, lost[gone], epochs[gone])
        run = client.get_run(lost[gone])
        curve = client.get_metric_history(lost[gone], "val_loss")
        assert max(p.timestamp for p in curve) <= run.info.end_time < before  # the end it had, not the replay's
        versions = client.search_model_versions("name = 'imdb-lost'")
        assert [v.run_id for v in versions] == [lost[gone]]
        models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{lost[gone]}'")
        assert [str(m.status) for m in models] == ["READY"] * len(models) and len({m.name for m in models}) == len(models)

        again = subprocess.run([sys.executable, *command[1:]], cwd=gone, env=environment(), capture_output=True,
                               text=True, timeout=600)
        assert again.returncode == 0 and "nothing to write" in again.stdout, again.stdout + again.stderr
        assert len(client.get_metric_history(lost[gone], "val_loss")) == epochs[gone]
        assert len(client.search_model_versions("name = 'imdb-lost'")) == 1
        assert len(client.search_logged_models([run.info.experiment_id],
                                               filter_string=f"source_run_id = '{lost[gone]}'")) == len(models)
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
        for server in servers.values():
            server.stop()


def test_a_kept_record_is_written_in_order_once_with_its_own_times(tmp_path):
    """The journal's side alone, on a local store: writes kept after a lost connection stay out of the store
    until replayed; the replay writes them with the times they had (the end's too), skips a point that
    reached the store before the connection died, and a second replay writes nothing."""
    from pipeline.tracking import operations
    from pipeline.tracking.journal import Journal

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = created_store(uri)
    run_id = client.create_run(client.create_experiment("kept")).info.run_id
    journal = Journal(uri, run_id, root=tmp_path / "mlflow-pending")
    journal.lose(ConnectionError("[Errno 111] Connection refused"))
    journal.stop()  # (no asking the store again: this test replays it itself)
    journal.params({"fit.epochs": 2})
    for step in (1, 2):
        journal.metrics({"val_loss": 1.0 / step}, step=step)
        time.sleep(0.01)
    journal.text("a note", "notes/note.txt")
    journal.end("KILLED")
    assert client.get_run(run_id).info.status == "RUNNING" and not client.get_metric_history(run_id, "val_loss")
    client.log_batch(run_id, metrics=journal.history["val_loss"][:1])  # it reached the store as the server went
    ended = json.loads((journal.folder / "operations.jsonl").read_text().splitlines()[-1])["end_time"]

    assert "5 kept writes written" in operations.replay(journal.folder)
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time, run.data.params) == ("KILLED", ended, {"fit.epochs": "2"})
    curve = client.get_metric_history(run_id, "val_loss")
    assert [(p.step, p.timestamp) for p in curve] == [(p.step, p.timestamp) for p in journal.history["val_loss"]]
    assert Path(client.download_artifacts(run_id, "notes/note.txt", str(tmp_path))).read_text() == "a note"
    assert "nothing to write" in operations.replay(journal.folder)
    assert len(client.get_metric_history(run_id, "val_loss")) == 2


def test_a_served_model_whose_download_the_lost_server_cut_short_is_saved_whole_in_its_place(tiny_run, tmp_path,
                                                                                              monkeypatch):
    """A shared training keeps its first budget's served model as the layout of the later ones' (downloaded once
    logged). The server lost half-way through that download: what it left is replaced by the model saved here,
    whole, which MLflow loads and which predicts as the trained model does; the journal hears the server is lost."""
    from pipeline.tracking import checkpoints, models

    cfg, _, objects = tiny_run
    place = tmp_path / "served"

    def cut_short(artifact_uri, dst_path):
        (Path(dst_path) / "artifacts").mkdir(parents=True)
        (Path(dst_path) / "artifacts" / "classifier.keras").write_bytes(b"half a file")
        raise ConnectionError("[Errno 111] Connection refused")

    class Run:  # the part of a TrackedRun _layout uses
        lost: list = []
        journal = type("Journal", (), {"lose": lambda self, error: Run.lost.append(error)})()

        def save_model(self, model, encoded, cfg, path):
            models.save(model, encoded, cfg, path)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", cut_short)
    path = checkpoints._layout(Run(), objects["model"], objects["encoded"], cfg, "models:/m-lost", str(place))
    assert path == str(place) and len(Run.lost) == 1
    loaded = mlflow.pyfunc.load_model(path)
    texts = ["A wonderful, moving film.", "Awful and boring."]
    assert loaded.predict(texts) == pytest.approx(mlflow.pyfunc.load_model(
        runs(cfg.tracking.uri)["tags.model_uri"][0]).predict(texts), abs=1e-6)
