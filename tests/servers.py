"""Servers the tests start on loopback and always stop: `mlflow server` and `mlflow models serve`."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import environment, free_port


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {seconds} s") from None
            time.sleep(1)


@contextlib.contextmanager
def running(args: list[str], cwd: Path, health: str, **env: str):
    process = subprocess.Popen(args, cwd=cwd, env=environment(**env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(health, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


# docs/serving.md's team server: the pipeline uses none of the server's own jobs (GenAI evaluations, scorers), so
# it starts without their job runner and consumer processes
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextlib.contextmanager
def tracking_server(folder: Path, backend: str | None = None, app_name: str | None = None, **env: str):
    """`mlflow server` on loopback, serving artifacts itself (the documented team setup; SQLite unless
    `backend` says otherwise; `app_name="basic-auth"` behind MLflow's login, settings in `env`)."""
    port = free_port()
    if app_name == "basic-auth" and "MLFLOW_AUTH_CONFIG_PATH" not in env:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(folder))
    with running(server_command(folder, port, backend, app_name), folder, f"http://127.0.0.1:{port}/health",
                 **SERVER_ENV, **env):
        yield f"http://127.0.0.1:{port}"


def auth_config(folder: Path) -> Path:
    """MLflow's basic-auth settings with its credential cache on (docs/serving.md): without it every request
    checks the password's hash again, about 25 s of each logged model here."""
    path = folder / "basic_auth.ini"
    path.write_text("[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///basic_auth.db\n"
                    "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    "auth_cache_ttl_seconds = 300\n")
    return path


def server_command(folder: Path, port: int, backend: str | None = None, app_name: str | None = None) -> list[str]:
    """The `mlflow server` command of `tracking_server` (to start it again on the same port and store)."""
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", backend or f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination", str(folder / "server-artifacts"), "--workers", "2",
            *(["--app-name", app_name] if app_name else [])]


@contextlib.contextmanager
def model_server(model_uri: str, folder: Path, tracking_uri: str):
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]
    with running(args, folder, f"http://127.0.0.1:{port}/ping", MLFLOW_TRACKING_URI=tracking_uri):
        yield f"http://127.0.0.1:{port}"


def postgresql_bin() -> Path | None:
    """Debian's PostgreSQL programs (package postgresql, which .ci/run installs), else pg_ctl's on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and (Path(on_path).parent / "initdb").exists() else None


@contextlib.contextmanager
def postgresql():
    """A throwaway PostgreSQL cluster (initdb, pg_ctl) on a free loopback port with a database `mlflow`;
    yields its SQLAlchemy URI. As root, the cluster runs as the `postgres` user (initdb refuses root)."""
    bindir = postgresql_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL (Debian's postgresql package; .ci/run installs it)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="imdb-postgres-"))  # not under pytest's folders, which only root can enter
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and no `postgres` user to run PostgreSQL as")
        os.chown(data, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    quiet = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "mlflow", "--auth=trust",
                        "-E", "UTF8"], **quiet)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w",
                        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], **quiet)
        try:
            subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow",
                            "mlflow"], **quiet)
            yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
    finally:
        shutil.rmtree(data, ignore_errors=True)
