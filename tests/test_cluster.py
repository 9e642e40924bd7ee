"""A sweep on a Ray cluster started separately (`ray start --head`), as a team runs one, for real.

Ray binds its head to the machine's network address, which tests must not use. Inside a network namespace
made here, loopback is the only interface: the cluster, the tracking server and the sweep's driver all run
in it, on 127.0.0.1. This process reads the server's SQLite store and artifact folder from the disk. The
cluster is started as on another machine: its own host name, its own folder, none of the driver's
environment (the data is named only by IMDB_ARCHIVE where the driver runs, as in the README's quick start).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import tiny_overrides
from tests.helpers import environment, output

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray at a time on this machine
RAY_PORT, SERVER_PORT = 6390, 5090  # inside the namespace, where nothing else listens
CLUSTER_HOST = "pipeline-test-cluster"  # the host name the cluster's processes see (a UTS namespace of their own)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    """`ip netns exec NS` as a command prefix, in a namespace whose only interface is loopback, up. Every
    process in it is these tests': at the end they are all ended, the cluster's helpers included. HOME is
    the tests' own, so that no ~/.ray/auth_token left by another Ray (a local sweep's) is read."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HOME", str(home))  # (tests.helpers.environment passes it on)
        yield from in_namespace()


def in_namespace():
    """The namespace made, its loopback up; at the end every process in it ended and it deleted."""
    name = f"pipeline-test-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `ip` command (iproute2) here: cannot make a network namespace")
    if made.returncode != 0:
        pytest.skip(f"network namespaces are not allowed here: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        inside = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in map(int, inside):  # processes in this namespace only, not any other Ray's
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name])


@pytest.fixture(scope="module")
def cluster(namespace, tmp_path_factory):
    """A Ray head with 2 CPUs and an MLflow server (SQLite, serving artifacts), both in the namespace, started
    once for the tests below (each sweeps into an experiment of its own). Yields (ray address, tracking URI as
    the jobs see it, tracking URI as this process reads it, artifacts, the cluster's own folder)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in environment().items() if k != "IMDB_ARCHIVE"}  # none of the driver's settings
    (tmp_path / "cluster").mkdir()
    head = ["ray", "start", "--head", f"--port={RAY_PORT}", "--num-cpus=2", "--include-dashboard=false",
            "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    started = subprocess.run([*namespace, "unshare", "--uts", "sh", "-c", f'hostname {CLUSTER_HOST} && exec "$@"', "sh",
                              *head], cwd=tmp_path / "cluster", env=env, capture_output=True, text=True, timeout=300)
    server = None
    try:
        assert started.returncode == 0, output(started)
        assert "127.0.0.1" in started.stdout  # the head is on loopback, the namespace's only interface
        store, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"
        server = subprocess.Popen([*namespace, sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                   "--port", str(SERVER_PORT), "--backend-store-uri", f"sqlite:///{store}",
                                   "--artifacts-destination", str(artifacts), "--workers", "2"],
                                  cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        health = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{SERVER_PORT}/health', timeout=5)"
        deadline = time.monotonic() + 180
        while subprocess.run([*namespace, sys.executable, "-c", health], capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "the tracking server did not start"
            time.sleep(1)
        yield f"127.0.0.1:{RAY_PORT}", f"http://127.0.0.1:{SERVER_PORT}", f"sqlite:///{store}", artifacts, tmp_path / "cluster"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        # the cluster's processes end with the namespace (its fixture)


def _driver(namespace, tmp_path, archive, address, uri, *overrides: str) -> tuple[list[str], dict[str, str]]:
    """The sweep's command and environment: the data only as IMDB_ARCHIVE, a path relative to where the
    driver runs (as the README's quick start has it), and the default cache folder, relative too."""
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(archive, tmp_path / "data" / "imdb.tar.gz")
    base = [o for o in tiny_overrides(archive, tmp_path) if not o.startswith(("tracking.uri", "ingest.path", "cache_dir"))]
    command = [*namespace, sys.executable, "-m", "pipeline", "-m", *base, *overrides, f"tracking.uri={uri}",
               "hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}", "sweep.threads=1",
               f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    return command, environment(IMDB_ARCHIVE=os.path.join("data", "imdb.tar.gz"))


def _family(store: str, experiment: str = "imdb-sentiment") -> tuple[object, list]:
    client = MlflowClient(store)
    every = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
    parents = [r for r in every if r.data.tags.get("sweep.parent") == "true"]
    assert len(parents) == 1
    return parents[0], [r for r in every if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def test_a_sweep_on_an_existing_ray_cluster(namespace, cluster, tiny_archive, tmp_path):
    address, uri, store, artifacts, cluster_folder = cluster
    # 4 jobs; the two of validation_size=30 leave no training data and fail
    command, env = _driver(namespace, tmp_path, tiny_archive, address, uri, "build.hidden_units=4,8",
                           "split.validation_size=8,30", "fit.epochs=2")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0 and "2 sweep job(s) failed" in done.stdout + done.stderr, output(done)
    assert "Ray is already running" not in done.stdout + done.stderr  # (it joined, not started its own)
    assert "(_run_job pid=" in done.stdout + done.stderr  # the jobs ran in the cluster's worker processes
    parent, children = _family(store)
    # the jobs read the driver's data and wrote the cache beside it, where the driver runs
    assert {c.data.params["ingest.path"] for c in children} == {str(tmp_path / "data" / "imdb.tar.gz")}
    assert (tmp_path / ".cache" / "pipeline").is_dir() and not (cluster_folder / ".cache").exists()
    statuses = {c.info.run_name: c.info.status for c in children}
    assert statuses == {"hidden_units=4,validation_size=8": "FINISHED", "hidden_units=8,validation_size=8": "FINISHED",
                        "hidden_units=4,validation_size=30": "FAILED", "hidden_units=8,validation_size=30": "FAILED"}
    assert parent.info.status == "FINISHED"
    client = MlflowClient(store)
    for child in children:
        if child.info.status == "FINISHED":
            assert [p.step for p in client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2]
        else:
            assert "leaves no training data" in child.data.tags["error"]
    # the analysis is on the parent, in the server's artifact store
    on_parent = glob.glob(str(artifacts / "*" / parent.info.run_id / "artifacts" / "analysis" / "*"))
    assert {"jobs.csv", "failed_jobs.csv", "report.md"} <= {Path(p).name for p in on_parent}

    # data the cluster's host cannot read: each job fails at once, naming the path and the host, no download
    command, env = _driver(namespace, tmp_path, tiny_archive, address, uri, "build.hidden_units=4,8", "fit.epochs=2",
                           "tracking.experiment_name=unreadable")
    command = ["ingest.download=true" if o == "ingest.download=false" else o for o in command]
    env["IMDB_ARCHIVE"] = str(tmp_path / "only-on-the-driver" / "imdb.tar.gz")  # (not on the driver either)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0 and "2 sweep job(s) failed" in done.stdout + done.stderr, output(done)
    experiment = client.get_experiment_by_name("unreadable").experiment_id
    failed = [r for r in client.search_runs([experiment]) if r.data.tags.get("mlflow.parentRunId")]
    assert len(failed) == 2 and {r.info.status for r in failed} == {"FAILED"}
    for run in failed:
        assert (f"ingest.path={tmp_path / 'only-on-the-driver' / 'imdb.tar.gz'} cannot be read on host {CLUSTER_HOST}"
                in run.data.tags["error"]), run.data.tags["error"]
    assert "download" not in (done.stdout + done.stderr).lower().replace("ingest.download=true", "")


def test_ctrl_c_of_the_ray_driver_leaves_no_child_running(namespace, cluster, tiny_archive, tmp_path):
    address, uri, store, _, _ = cluster
    command, env = _driver(namespace, tmp_path, tiny_archive, address, uri, "build.hidden_units=4,8",
                           "fit.epochs=100000", "tracking.experiment_name=interrupted")
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # until both jobs are training on the cluster
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()[-3000:]
            time.sleep(2)
            if os.path.exists(store.removeprefix("sqlite:///")) and MlflowClient(store).get_experiment_by_name(
                    "interrupted"):
                try:
                    _, children = _family(store, "interrupted")
                except AssertionError:
                    continue
                client = MlflowClient(store)
                if len(children) == 2 and all(client.get_metric_history(c.info.run_id, "val_loss") for c in children):
                    break
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    deadline = time.monotonic() + 120
    while any(c.info.status == "RUNNING" for c in _family(store, "interrupted")[1]) and time.monotonic() < deadline:
        time.sleep(2)
    parent, children = _family(store, "interrupted")
    assert {c.info.status for c in children} == {"KILLED"}
    assert parent.info.status == "KILLED"
    assert driver.returncode != 0
    assert all("Ray stopped the job" in c.data.tags.get("error", "") for c in children)
    client = MlflowClient(store)
    recorded = [len(client.get_metric_history(c.info.run_id, "val_loss")) for c in children]
    time.sleep(10)  # nothing trains on after its run ended
    assert [len(client.get_metric_history(c.info.run_id, "val_loss")) for c in children] == recorded
