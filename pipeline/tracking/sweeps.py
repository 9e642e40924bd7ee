"""The sweep as MLflow shows it: one parent run, a child run per job, the analysis on the parent
(pipeline.analysis, along the axes the parent records).

pipeline.sweep (Hydra's side) calls these: the parent is opened when the multirun starts (or adopted
from `mlflow run`), jobs record into children through TrackedRun, and at the end the children are read
back (read_jobs), analysed by pipeline.analysis (pure) and the table, figures and report are written to the
parent (write_analysis).
"""

from __future__ import annotations

import json
import logging
import os
import time

import mlflow

import pipeline
from pipeline import config, resume
from pipeline.config import EXPERIMENT, PARENT_RUN
from pipeline.signals import SIGNALS
from pipeline.tracking import CURVES, git_tags, holder, use
from pipeline.tracking.projects import project_run

log = logging.getLogger(__name__)
TRAINING = "pipeline.training"  # the tag of a run recorded from a shared training: the run it started in
SETTINGS = "sweep/settings.json"  # on the parent: every setting the sweep was asked, flattened, as strings


def open_sweep_parent(cfg: config.PipelineConfig, axes: dict[str, str], sweep_dir: str) -> tuple[str, str, list[str]]:
    """Create the sweep's parent run, or adopt the one `mlflow run` created, and hold it for this command
    (holder.py). Returns (run id, experiment id, the axes' keys in the order the sweep first gave them, so
    that a resumed job is named as it was). The parent records what it was asked: the axes as `sweep.<key>`
    params and their order in the tag `sweep.axes`, every other setting in sweep/settings.json. A resume
    that asks otherwise is refused (ValueError), and one while another command works on the sweep
    (holder.SweepHeld), before anything is written."""
    from mlflow.entities import Param

    use(config.tracking_uri(cfg.tracking))
    client = mlflow.MlflowClient()
    settings = resume.as_recorded(config.flatten(cfg))
    # Under `mlflow run` the project's run becomes the parent; the variable must not reach the jobs,
    # or the first job would record into the parent itself.
    adopted = os.environ.pop("MLFLOW_RUN_ID", None)
    recorded, order = False, list(axes)
    if cfg.sweep.resume:  # an interrupted sweep continues under its own parent
        run = client.get_run(cfg.sweep.resume)
        if run.data.tags.get("sweep.parent") != "true":
            raise ValueError(f"sweep.resume={cfg.sweep.resume}: that run is not a sweep's parent run")
        recorded = any(a.path == SETTINGS for a in client.list_artifacts(run.info.run_id, "sweep"))
        if not recorded:
            log.warning("sweep.resume=%s: that parent recorded no settings (it was made before they were kept); "
                        "each job's own recorded settings decide whether it runs again", run.info.run_id)
        resume.check_same_sweep(run.info.run_id, _axes(run), {key: value[:6000] for key, value in axes.items()},
                                mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{SETTINGS}") if recorded else None,
                                settings)
        order = _axis_order(client, run, list(axes))
        holder.take(run.info.run_id)
    else:
        name = cfg.tracking.run_name or "sweep " + ",".join(key.rsplit(".", 1)[-1] for key in axes)
        if adopted:  # (or a new parent it points to, when it was made in the Default experiment: projects.py)
            run = project_run(client, adopted, cfg.tracking.experiment_name, name, pipeline.STARTED)
        else:
            experiment = mlflow.set_experiment(cfg.tracking.experiment_name)
            run = client.create_run(experiment.experiment_id, run_name=name, start_time=int(pipeline.STARTED * 1000))
    run_id = run.info.run_id
    try:
        if cfg.sweep.resume:
            client.update_run(run_id, status="RUNNING")
            if adopted and adopted != run_id:  # `mlflow run` made a run of its own: point it to the parent
                client.set_tag(adopted, "sweep.resumed_parent", run_id)
        else:
            holder.take(run_id, new=True)
            client.log_batch(run_id, params=[Param(f"sweep.{key}", value[:6000]) for key, value in axes.items()],
                             tags=[mlflow.entities.RunTag("sweep.axes", json.dumps(order))])
        client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in
                                       {"sweep.parent": "true", "sweep.dir": sweep_dir, **git_tags()}.items()])
        if not recorded:  # (not under another prefix of params: the analysis reads every `sweep.` param as an axis)
            client.log_dict(run_id, settings, SETTINGS)
    except BaseException as error:  # (an interrupt, or the store refusing a write)
        close_sweep_parent(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    return run_id, run.info.experiment_id, order


def _axis_order(client, parent, axes: list[str]) -> list[str]:
    """The parent's axes in the order its sweep first gave them: its tag `sweep.axes`, else (a parent made
    before it was kept) the order its first child's name gives them; else `axes` as they are."""
    if "sweep.axes" in parent.data.tags:
        first = json.loads(parent.data.tags["sweep.axes"])
    else:
        named = _children(client, parent.info.run_id, max_results=1)
        shorts = [part.split("=", 1)[0] for run in named for part in run.info.run_name.split(",")]
        first = sorted(axes, key=lambda key: shorts.index(key.rsplit(".", 1)[-1]) if key.rsplit(".", 1)[-1] in shorts
                       else len(shorts))
    return [key for key in first if key in axes] + [key for key in axes if key not in first]


def record_failed_job(run_name: str, error: Exception) -> None:
    """A sweep job that could not start (invalid settings): a FAILED child run that says why."""
    client = mlflow.MlflowClient()
    run = client.create_run(os.environ[EXPERIMENT], run_name=run_name,
                            tags={"mlflow.parentRunId": os.environ[PARENT_RUN],
                                  "error": f"{type(error).__name__}: {error}"[:5000]})
    client.set_terminated(run.info.run_id, "FAILED")


def _children(client, parent_run_id: str, where: str = "", order: str = "ASC", max_results: int = 5000) -> list:
    """The parent's child runs (and `where`, a filter clause that starts with " and "), by start time."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'{where}",
                              max_results=max_results, order_by=[f"attributes.start_time {order}"])


def finished_child(parent_run_id: str, axes: list[str], run_name: str, asked: dict[str, str]) -> dict | None:
    """The latest complete, FINISHED child of `parent_run_id` that is the same job as the one asked (the
    same settings on the sweep's `axes`, resume.job_identity; whatever its run was named): its id, best
    validation accuracy and `differs`, the settings asked now (`asked`, flattened) that it did not run with."""
    client = mlflow.MlflowClient()
    job = resume.job_identity(asked, axes, run_name)
    finished = " and attributes.status = 'FINISHED' and tags.`pipeline.complete` = 'true'"
    for run in _children(client, parent_run_id, finished, "DESC"):
        if resume.job_identity(run.data.params, axes, run.info.run_name) == job:
            history = client.get_metric_history(run.info.run_id, "val_accuracy")
            best = max((point.value for point in history), default=float("nan"))
            return {"run_id": run.info.run_id, "val_accuracy": best,
                    "differs": resume.differences(run.data.params, asked)}
    return None


def recorded_child(parent_run_id: str, settings, since: float) -> bool:
    """Whether a child of the parent started since `since` (time.time()) was recorded, with `settings`' run name, from
    a shared training (tracking/budgets.py) and has ended FINISHED or FAILED: a job not to run again."""
    client, name = mlflow.MlflowClient(), settings.tracking.run_name
    return any(run.info.run_name == name and TRAINING in run.data.tags and run.info.status in ("FINISHED", "FAILED")
               for run in _children(client, parent_run_id, f" and attributes.start_time >= {int(since * 1000)}"))


def end_running_children(parent_run_id: str, why: str) -> None:
    """The parent's children still RUNNING end KILLED, with an `error` tag that says why."""
    client = mlflow.MlflowClient()
    for child in _children(client, parent_run_id, " and attributes.status = 'RUNNING'"):
        client.set_tag(child.info.run_id, "error", why)
        client.set_terminated(child.info.run_id, "KILLED")


def close_sweep_parent(run_id: str, status: str) -> None:
    """End the parent (if it is RUNNING) with `status`, and let go of it (holder.py)."""
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    finally:
        holder.release(run_id)


def _history(client, run_id: str):
    """A child's curves as a table, one row per epoch (columns epoch, loss, accuracy, val_loss, val_accuracy, and
    epoch_seconds: each epoch's training time)."""
    import pandas as pd

    frame = pd.DataFrame({curve: {point.step: point.value for point in client.get_metric_history(run_id, curve)}
                          for curve in (*CURVES, "epoch_seconds")}).sort_index()
    return frame.rename_axis("epoch").reset_index()


def _axes(parent) -> dict[str, str]:
    """The sweep's axes as its parent records them (param sweep.<dotted key> = the values as written)."""
    return {key.removeprefix("sweep."): value for key, value in parent.data.params.items() if key.startswith("sweep.")}


def _setting(key: str, params: dict, run_name: str):
    """A child's value on axis `key`: its param; for a config group (`build`), the option its name records
    (`build=cnn`), else the group's family param."""
    if key in params:
        return params[key]
    named = dict(part.split("=", 1) for part in run_name.split(",") if "=" in part)
    return named.get(key.rsplit(".", 1)[-1], params.get(f"{key}.family"))


def read_jobs(parent_run_id: str, budget: str):
    """The sweep as the analysis needs it, read back from the parent's children: (axes, jobs, histories,
    failed, early, interrupted). `axes`: the swept keys and their values as written, in the sweep's order;
    `jobs`: pipeline.analysis.job_row's arguments for each finished (or pruned) job; `histories`: their curves
    by run id; `failed`: job, run_id, error of the jobs that failed; `early`: the early-stopping reference job,
    if the sweep ran one; `interrupted`: job, run_id, error of the jobs whose attempt was interrupted (KILLED)
    and not finished since. A job is counted once, however often it was attempted (resume.job_identity).
    `budget`: the dotted key of the epoch budget (pipeline.analysis.BUDGET), recorded for every job."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    axes = _axes(parent)
    latest: dict[tuple, object] = {}  # a resumed sweep can hold several attempts of one job: keep one
    for run in _children(client, parent_run_id):  # oldest first, so later attempts win, and a finished one beats any other
        job = resume.job_identity(run.data.params, axes, run.info.run_name)
        kept = latest.get(job)
        if kept is None or run.info.status == "FINISHED" or kept.info.status != "FINISHED":
            latest[job] = run
    jobs, histories, failed, early, interrupted = [], {}, [], None, []
    for run in latest.values():
        name, run_id = run.info.run_name, run.info.run_id
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        pruned = tags.get("search.pruned") == "true"  # a search's pruner stopped it: a job, whether it was scored or not
        history = _history(client, run_id) if pruned or run.info.status == "FINISHED" else None
        if history is None or history["val_loss"].isna().all() or not (pruned or "test_accuracy" in metrics):
            ended = {"job": name, "run_id": run_id, "error": tags.get("error", f"run {run.info.status.lower()}")}
            (interrupted if run.info.status == "KILLED" else failed).append(ended)
            continue
        # the reference job pipeline.sweep adds (sweep.early_stopping_reference): early stopping, not an axis
        if params.get("fit.early_stopping.enabled") == "True" and name.split(",")[0] == "early_stopping":
            early = {"job": name, "run_id": run_id, "test_accuracy": metrics["test_accuracy"],
                     "stopped_epoch": int(metrics.get("stopped_epoch", metrics["epochs_trained"])),
                     "best_epoch": int(metrics.get("best_epoch", metrics["best_val_loss_epoch"]))}
            continue
        histories[run_id] = history
        settings = {key: _setting(key, params, name) for key in axes}
        settings[budget] = int(params[budget])
        extra = {"served": params.get("evaluate.serve"),  # which checkpoint its test_accuracy measures
                 "training": tags.get(TRAINING)}  # the run its training started in, if it shared one
        if {"build", "build.family"} & set(axes):  # a family's own epoch budget: is it compared below it?
            own = config.family_epochs(settings.get("build") or params.get("build.family"))  # (conf/build/<option>)
            extra |= {"family": params.get("build.family"), "family_epochs": own}
        if "search.trial" in tags:
            extra["trial"] = int(tags["search.trial"])
        for role in ("best", "last"):  # each run's two checkpoints (pipeline.tracking.checkpoints), where it logged them
            if f"{role}.test_accuracy" in metrics:
                extra[f"{role}_epoch"] = int(metrics[f"{role}.epoch"])
                extra[f"{role}_epoch_test_accuracy"] = metrics[f"{role}.test_accuracy"]
        jobs.append(dict(
            job=name, run_id=run_id, settings=settings, history=history.dropna(subset=["val_loss"]),
            test_accuracy=metrics.get("test_accuracy", float("nan")), status=run.info.status, pruned=pruned,
            epochs_trained=int(metrics.get("epochs_trained", history["val_loss"].notna().sum())),
            epoch_seconds=float(history["epoch_seconds"].median()), fit_seconds=float(tags.get("seconds.fit", "nan")),
            parameters=int(metrics.get("model.parameters", 0)), model_size_mb=metrics.get("model.size_mb", float("nan")),
            **extra))
    # the sweep's own order of the axes (the parent's params come back sorted by name)
    axes = {key: axes[key] for key in _axis_order(client, parent, list(axes))}
    return axes, jobs, histories, failed, early, interrupted


def write_analysis(parent_run_id: str, result, early: dict | None, alias: str | None = None) -> None:
    """The analysis (pipeline.analysis.Analysis) on the parent: analysis/ (jobs.csv, report.md, figures,
    ranking.csv), headline metrics, the best job's tags; with `alias`, the best job's registered model
    version (if it registered one) gets that alias."""
    client = mlflow.MlflowClient()
    client.log_text(parent_run_id, result.table.to_csv(index=False), "analysis/jobs.csv")
    if not result.failed.empty:
        client.log_text(parent_run_id, result.failed.to_csv(index=False), "analysis/failed_jobs.csv")
    client.log_text(parent_run_id, result.report, "analysis/report.md")
    if result.ranking is not None:
        client.log_text(parent_run_id, result.ranking.to_csv(index=False), "analysis/ranking.csv")
    for name, figure in result.figures.items():
        client.log_figure(parent_run_id, figure, f"analysis/{name}")  # (a pyplot-free Figure: nothing to close)
    if result.headline:
        client.log_batch(parent_run_id, metrics=[
            mlflow.entities.Metric(key, value, int(time.time() * 1000), 0)
            for key, value in result.headline.items() if value == value])  # NaN: nothing to compare
    if early:
        client.set_tag(parent_run_id, "sweep.early_stopping_run", early["run_id"])
    if result.best_run is not None:
        best = result.table.set_index("run_id").loc[result.best_run]
        client.set_tag(parent_run_id, "sweep.best_run", result.best_run)
        client.set_tag(parent_run_id, "sweep.best_job", best["job"])
        if result.ranking is not None:
            client.set_tag(parent_run_id, "sweep.best_family", result.ranking["family"].iloc[0])
        if alias:
            promote(client, parent_run_id, result.best_run, alias)


def promote(client, parent_run_id: str, run_id: str, alias: str) -> None:
    """Point `alias` of the registered model at the version that run `run_id` registered, if it did."""
    model_id = client.get_run(run_id).data.tags.get("model_uri", "").removeprefix("models:/")
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if not model_id or getattr(v, "model_id", None) in (None, model_id)]
    if not versions:
        return
    version = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(version.name, alias, version.version)
    client.set_tag(parent_run_id, "sweep.champion", f"models:/{version.name}@{alias} -> version {version.version}")
    log.info("models:/%s@%s now serves version %s (run %s)", version.name, alias, version.version, run_id)


def tag_search(tags: dict[str, str], active: bool = False) -> None:
    """An Optuna search's tags (pipeline.search): on a trial's own run (`active`), else on the sweep's parent."""
    with SIGNALS.held():
        if active:
            mlflow.set_tags(tags)
        elif os.environ.get(PARENT_RUN):
            mlflow.MlflowClient().log_batch(os.environ[PARENT_RUN], tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
