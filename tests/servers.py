"""Servers the tests start on loopback and always stop: `mlflow server` and `mlflow models serve`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


@contextlib.contextmanager
def tracking_server(folder: Path, backend: str | None = None):
    """`mlflow server` on loopback, serving artifacts itself (the documented team setup, with SQLite)."""
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", backend or f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination", str(folder / "server-artifacts"), "--workers", "2"]
    with running(args, folder, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def model_server(model_uri: str, folder: Path, tracking_uri: str):
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]
    with running(args, folder, f"http://127.0.0.1:{port}/ping", MLFLOW_TRACKING_URI=tracking_uri):
        yield f"http://127.0.0.1:{port}"
