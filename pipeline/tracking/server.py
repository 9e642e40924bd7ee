"""Is the tracking server there, and does it let us in? Asked before any data is read or TensorFlow loads.
And where its UI shows a run (`ui_links`).

`check_reachable(uri)` fails in seconds (not after 40 epochs) when an http(s) tracking server does not answer
or refuses the credentials MLflow's client would send. Our own probe, not MLflow's client: that one retries an
unreachable server with backoff for about two minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES), right mid-run but not at
the start, and changing the variable would change it for the whole process.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from pipeline import config
from pipeline.config import redact


# What MLflow 3.18's client opens (mlflow/tracking/_tracking_service/utils.py): servers, and SQLAlchemy's databases
# (a dialect may name its driver: postgresql+psycopg2). `file:` and plain folders: refused unless MLFLOW_ALLOW_FILE_STORE.
SERVERS, DATABASES, HOSTED = ("http", "https"), ("sqlite", "postgresql", "mysql", "mssql"), ("databricks", "databricks-uc", "uc")
FIX = "use sqlite:///mlflow.db (a file here), sqlite:////<folder>/mlflow.db, http(s)://<server> or postgresql://..."


def check_store(uri: str) -> None:
    """A tracking URI that is not a store MLflow opens, or an SQLite database file that is not one or cannot be
    written, is refused in one line naming tracking.uri and the fix (not MLflow's traceback, minutes later)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    shown = redact("uri", uri)
    if scheme in ("", "file") and not os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        raise ValueError(f"tracking.uri={shown}: a folder of files is not a store MLflow 3 opens (unless MLFLOW_ALLOW_FILE_STORE=true); {FIX}")
    if scheme not in SERVERS + DATABASES + HOSTED + ("", "file"):
        raise ValueError(f"tracking.uri={shown}: MLflow knows no {scheme!r} store; {FIX}")
    if scheme != "sqlite":
        return
    database = uri.split("?", 1)[0].removeprefix("sqlite:").removeprefix("//")
    if database in ("", "/", "/:memory:"):
        raise ValueError(f"tracking.uri={shown}: an in-memory database keeps nothing; {FIX}")
    path = Path(database[1:] if database.startswith("/") else database).expanduser().absolute()
    if path.is_dir():
        raise ValueError(f"tracking.uri={shown}: {path} is a folder, not a database file; name a file in it, "
                         f"e.g. tracking.uri=sqlite:///{path / 'mlflow.db'}")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as file:
            if file.read(16) != b"SQLite format 3\x00":
                raise ValueError(f"tracking.uri={shown}: {path} is not an SQLite database (its first bytes say otherwise); "
                                 f"name a new or existing .db file, e.g. tracking.uri=sqlite:///{path.with_suffix('.db')}")
    folder = path.parent  # (SQLite writes its journal beside the database)
    if not folder.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {folder}, where tracking.uri={shown} keeps its runs: run from a folder "
                              "you can write, or set tracking.uri=sqlite:////<a folder you can write>/mlflow.db")
    if not path.exists():  # a new store's experiment keeps its artifacts in ./mlruns, where the command runs
        here = Path.cwd()
        if not os.access(here / "mlruns" if (here / "mlruns").is_dir() else here, os.W_OK):
            raise PermissionError(f"cannot write {here}: a new tracking store keeps its runs' artifacts in ./mlruns "
                                  "there; run from a folder you can write")


def check_reachable(uri: str, timeout: float = 5.0) -> str:
    """Fail in seconds, before any work, when the store is not one MLflow opens or cannot be written (check_store),
    or a tracking server does not answer (not after 40 epochs), or refuses us (a server behind MLflow's
    basic-auth, without the credentials MLflow's client sends)."""
    check_store(uri)
    if not uri.startswith(("http://", "https://")):
        return uri
    import base64
    import urllib.error
    import urllib.request

    ask = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", b'{"max_results": 1}',
                                 {"Content-Type": "application/json"})
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        ask.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        urllib.request.urlopen(ask, timeout=timeout).close()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403) and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
            raise PermissionError(
                f"the tracking server {redact('uri', uri)} refuses {'these' if user else 'requests without'} credentials "
                f"({error.code}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of it") from None
        if error.code >= 500:
            raise ConnectionError(f"tracking server {redact('uri', uri)} answers with {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"cannot reach the tracking server at {redact('uri', uri)} ({reason}); start it, or point "
            "tracking.uri / MLFLOW_TRACKING_URI elsewhere (unset both for the local store mlflow.db)") from None
    return uri


def ui_links(uri: str, experiment_id: str, run_id: str) -> str:
    """Where MLflow's UI shows the run and its experiment's runs table. MLflow 3.18's UI opens an experiment
    on its GenAI pages unless the browser chose "Model training" or the URL asks for it, as these do."""
    if uri.startswith("sqlite:"):  # `mlflow ui` serves it at its default address
        base, head = "http://127.0.0.1:5000", f"See it: mlflow ui --backend-store-uri {shlex.quote(uri)}, then open"
    elif uri.startswith(("http://", "https://")):
        base, head = config.URL_USERINFO.sub(lambda m: m.group("scheme"), uri).rstrip("/"), "See it:"
    else:
        return ""
    runs, view = f"{base}/#/experiments/{experiment_id}/runs", "?workflowType=machine_learning"
    return f"\n{head}\n  the run         {runs}/{run_id}{view}\n  the runs table  {runs}{view}"
