"""Writing one kept operation of a run to the store, and a whole kept record (`python -m pipeline.replay`).

An operation is a JSON object (journal.py keeps them in order in `operations.jsonl`): params, tags, metrics
(points [key, value, timestamp, step, model name or None]), text, figure (live only), file (an artifact from
the record's folder), dataset, model (a saved model folder: a LoggedModel of the run, named, at its step,
registered), model_uri (the run's tag) and end (status, end time). Given what the store already holds
(`stored`), writing one again changes nothing: points, models and registered versions found are skipped.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from pipeline.config import redact
from pipeline.tracking.server import check_reachable

OPERATIONS, WRITTEN, ABOUT, MLMODEL = "operations.jsonl", "written.txt", "run.json", "MLmodel"
BATCH = 1000  # log_batch takes at most 1000 metrics a call


def png(figure) -> bytes:
    """A matplotlib Figure as PNG (what figure.savefig writes), drawn once: a figure several runs log (the budgets of
    a shared training serving one epoch, pipeline/evaluate.py) is not drawn again."""
    if getattr(figure, "pipeline_png", None) is None:
        drawn = io.BytesIO()
        figure.savefig(drawn, format="png")
        figure.pipeline_png = drawn.getvalue()
    return figure.pipeline_png


def write_kept(client: MlflowClient, run_id: str, kept: list[dict], written: int, folder: Path,
               models: dict[str, str]) -> int:
    """Write kept[written:] in order, skipping what the store holds already; how many are written."""
    stored: dict[str, set] = {}  # metric key -> (step, timestamp) of the points the store holds
    for index in range(written, len(kept)):
        apply(client, run_id, kept[index], models, folder, stored)
        written = index + 1
        (folder / WRITTEN).write_text(str(written))
    return written


def apply(client: MlflowClient, run_id: str, operation: dict, models: dict[str, str], folder: Path,
          stored: dict[str, set] | None = None) -> None:
    """Write one operation. `stored` given (a kept record being written): skip what the store holds already."""
    kind = operation["op"]
    if kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in operation["params"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in operation["tags"].items()])
    elif kind == "metrics":
        metrics = [Metric(key, value, stamp, step, model_id=_model_id(client, run_id, models, model),
                          run_id=run_id if model else None) for key, value, stamp, step, model in operation["points"]]
        if stored is not None:
            for key in {m.key for m in metrics if m.model_id is None} - stored.keys():
                stored[key] = {(p.step, p.timestamp) for p in client.get_metric_history(run_id, key)}
            metrics = [m for m in metrics if m.model_id is not None or (m.step, m.timestamp) not in stored[m.key]]
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + BATCH])
        for m in metrics:
            if stored is not None and m.model_id is None:
                stored[m.key].add((m.step, m.timestamp))
    elif kind == "text":
        client.log_text(run_id, operation["text"], operation["path"])
    elif kind == "figure":  # (as client.log_figure writes it, from the PNG drawn once)
        directory, _, name = operation["path"].rpartition("/")
        with tempfile.TemporaryDirectory() as files:
            Path(files, name).write_bytes(png(operation["figure"]))
            client.log_artifact(run_id, str(Path(files, name)), directory or None)
    elif kind == "file":
        client.log_artifact(run_id, str(folder / operation["file"]), operation["path"])
    elif kind == "dataset":
        _log_dataset(client, run_id, operation, check=stored is not None)
    elif kind == "model":
        models[operation["name"]] = _log_model(client, run_id, operation, folder)
    elif kind == "model_uri":
        client.set_tag(run_id, "model_uri", f"models:/{_model_id(client, run_id, models, operation['model'])}")
    elif kind == "end":
        client.set_terminated(run_id, operation["status"], end_time=operation["end_time"])
    else:
        raise ValueError(f"unknown operation {kind!r} in a kept record")


def _log_dataset(client: MlflowClient, run_id: str, operation: dict, check: bool) -> None:
    from mlflow.tracking.fluent import _create_dataset_input

    from pipeline.tracking.datasets import ReviewsDataset, registering

    if check and any(d.dataset.digest == operation["digest"][:20] for d in client.get_run(run_id).inputs.dataset_inputs):
        return
    dataset = ReviewsDataset(operation["source"], operation["digest"], operation["counts"])
    registering(lambda: client.log_inputs(run_id, datasets=[_create_dataset_input(dataset, operation["context"])]))


def _find_model(client: MlflowClient, run_id: str, name: str):
    """The run's LoggedModel named `name` (the finished one, if more), or None."""
    run = client.get_run(run_id)
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    return max(found, key=lambda m: (str(m.status) == "READY", m.creation_timestamp), default=None)


def fail_model(client: MlflowClient, run_id: str, name: str, error: BaseException) -> None:
    """The run's model `name`, if its logging left it PENDING, ends FAILED with the error as a tag."""
    from mlflow.entities import LoggedModelStatus

    found = _find_model(client, run_id, name)
    if found is not None and str(found.status) == str(LoggedModelStatus.PENDING):
        client.set_logged_model_tags(found.model_id, {"error": f"{type(error).__name__}: {error}"[:5000]})
        client.finalize_logged_model(found.model_id, LoggedModelStatus.FAILED)


def _model_id(client: MlflowClient, run_id: str, models: dict[str, str], name: str | None) -> str | None:
    if name is not None and name not in models:
        found = _find_model(client, run_id, name)
        if found is None:
            raise ValueError(f"run {run_id} has no model {name!r} to link")
        models[name] = found.model_id
    return models.get(name) if name is not None else None


def _log_model(client: MlflowClient, run_id: str, operation: dict, folder: Path) -> str:
    """A saved model folder as a LoggedModel of the run: created (or the one a lost connection left PENDING,
    found by its name), its MLmodel naming it, uploaded, linked at its step, READY, registered. Its id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    name, step = operation["name"], operation["step"]
    logged = _find_model(client, run_id, name)
    if logged is None or str(logged.status) != "READY":
        run = client.get_run(run_id)
        if logged is None:
            logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                                tags=operation["tags"], params=run.data.params)  # as log_model does
        saved = folder / operation["folder"]
        described = Model.load(saved / MLMODEL)
        described.model_id = described.model_uuid = logged.model_id
        described.artifact_path, described.run_id = logged.artifact_location, run_id
        described.save(saved / MLMODEL)
        client.log_model_artifacts(logged.model_id, str(saved))
        if not any(o.model_id == logged.model_id for o in run.outputs.model_outputs):
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        if operation.get("link_step"):  # the run's metrics at its step, as log_model links them
            at_step = [Metric(p.key, p.value, p.timestamp, p.step, model_id=logged.model_id, run_id=run_id)
                       for key in run.data.metrics for p in client.get_metric_history(run_id, key)
                       if p.step == step and p.model_id is None]
            for start in range(0, len(at_step), BATCH):
                client.log_batch(run_id, metrics=at_step[start:start + BATCH])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    registered = operation.get("registered")
    if registered and not any(v.source == f"models:/{logged.model_id}"
                              for v in client.search_model_versions(f"name = '{registered}'")):
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(registered)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        client.create_model_version(registered, f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id)
    return logged.model_id


def replay(folder: Path) -> str:
    """Write the record kept in `folder` (python -m pipeline.replay): what the store lacks, in order. What it did."""
    about = folder / ABOUT
    if not about.exists():
        raise FileNotFoundError(f"{folder} holds no kept record of a run (no {ABOUT}); give the folder the run named")
    run = json.loads(about.read_text())
    kept = []
    for line in (folder / OPERATIONS).read_text().splitlines():
        try:
            kept.append(json.loads(line))
        except ValueError:  # a last line cut short when the process was killed
            pass
    done = int((folder / WRITTEN).read_text() or 0) if (folder / WRITTEN).exists() else 0
    if done >= len(kept):
        return f"run {run['run_id']}: its kept record was written already; nothing to write"
    uri = check_reachable(run["uri"], timeout=30)  # (a server just started again may be slow to answer)
    import mlflow

    mlflow.set_tracking_uri(uri)  # (the artifact store's address is the tracking server's)
    client = MlflowClient(uri)
    write_kept(client, run["run_id"], kept, done, folder, {})
    status = client.get_run(run["run_id"]).info.status
    return f"run {run['run_id']}: {len(kept) - done} kept writes written to {redact('uri', uri)}; the run is {status}"
