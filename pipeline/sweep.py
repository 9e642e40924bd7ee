"""Hydra's side of a sweep: a multirun as one parent run with a child per job, and its analysis.

SweepCallback (named in conf/config.yaml) acts in multirun mode: it opens the parent run
(or adopts the one `mlflow run` created), hands its id and what the driver resolved (the variables the
config reads, MLflow's client settings, the directory relative paths mean) to the jobs through the
environment (inherited by joblib workers, given to Ray's) and, when they are done, runs the
early-stopping reference job if asked, writes the analysis to the parent and ends it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import search
from pipeline.config import EXPERIMENT, PARENT_RUN, PipelineConfig, flatten, load, tracking_uri
from pipeline.console import CONSOLE
from pipeline.resume import as_recorded, describe, resume_command
from pipeline.signals import SIGNALS

log = logging.getLogger(__name__)
AXES = "PIPELINE_SWEEP_AXES"
RESUMING = "PIPELINE_SWEEP_RESUMING"
# Where the driver ran (relative paths mean this directory), its host, and the data path it could read
DIRECTORY, DRIVER_HOST, DRIVER_DATA = "PIPELINE_SWEEP_DIRECTORY", "PIPELINE_SWEEP_HOST", "PIPELINE_SWEEP_DATA"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # hydra/sweeper=basic, as its config names it
BUDGET_SWEEPER = "hydra_plugins.pipeline_search.BudgetSweeper"  # pipeline.budgets.BudgetSweeper, as Hydra knows it
READS_VARIABLE = re.compile(r"oc\.env:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")  # ${oc.env:NAME,default} in a config


def sweep_axes(hydra_cfg: DictConfig) -> dict[str, str]:
    """The swept keys and their values as written: sweeper params, then command-line sweeps (which win)."""
    written = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    written += list(hydra_cfg.overrides.task)
    axes: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(written):
        if override.is_sweep_override():
            axes[override.key_or_group] = override.input_line.split("=", 1)[1]
        else:  # a plain command-line value replaces a swept one from the config
            axes.pop(override.key_or_group, None)
    return axes


def job_name(task_overrides: list[str], axes: list[str]) -> str:
    """What differs between jobs, e.g. `hidden_units=32,epochs=20`, in the order of the axes."""
    values = {o.key_or_group: o.input_line.split("=", 1)[1]
              for o in OverridesParser.create().parse_overrides(list(task_overrides))}
    return ",".join(f"{key.rsplit('.', 1)[-1]}={values[key]}" for key in axes if key in values)


def reference_name(settings: PipelineConfig, axes) -> str:
    """The early-stopping reference job's name: early stopping at the sweep's own settings for its axes,
    e.g. `early_stopping,hidden_units=16,epochs=40` (a group axis such as `build`: the option chosen)."""
    flat = flatten(settings)
    base = [f"{key.rsplit('.', 1)[-1]}={flat.get(key, flat.get(f'{key}.family'))}" for key in axes]
    return ",".join(["early_stopping", *base])


def finished_job(settings: PipelineConfig, quiet: bool = False) -> dict | None:
    """When resuming a sweep: the job's earlier FINISHED child run under the parent (the same settings on
    the axes, whatever its run's name), if it ran with the settings asked now. One that ran with others is
    said (unless `quiet`: the plan asks before the job does), and the job runs again."""
    if not os.environ.get(RESUMING):
        return None
    from pipeline.tracking import sweeps

    name = settings.tracking.run_name
    previous = sweeps.finished_child(os.environ[PARENT_RUN], json.loads(os.environ.get(AXES, "[]")), name,
                                     as_recorded(flatten(settings)))
    if previous and previous["differs"]:
        if quiet:
            return None
        log.warning("sweep job %s finished before as run %s with other settings (%s): it runs again", name,
                    previous["run_id"], describe(previous["differs"], "then"))
        return None
    return previous


def child_name(task_overrides: list[str], job_number: int) -> str:
    return job_name(task_overrides, json.loads(os.environ.get(AXES, "[]"))) or f"job-{job_number}"


def child_settings(settings: PipelineConfig, task_overrides: list[str], job_number: int) -> PipelineConfig:
    """A job's settings inside a sweep, as its driver resolved them wherever it runs: its run name (what
    differs), relative paths absolute against the driver's directory, the data readable on this host."""
    name = settings.tracking.run_name or child_name(task_overrides, job_number)
    settings = absolute(replace(settings, tracking=replace(settings.tracking, run_name=name)),
                        os.environ.get(DIRECTORY) or os.getcwd())
    from pipeline import ingest  # (numpy and pandas: only once a job runs)

    ingest.check(settings.ingest)  # (ValueError: a FAILED child that says why)
    readable_here(settings)
    return settings


def absolute(settings: PipelineConfig, directory: str) -> PipelineConfig:
    """`settings` with its relative paths (ingest.path, cache_dir, a file-based tracking.uri) made
    absolute against `directory`, where the user ran the command: a worker elsewhere means the same files."""
    path = settings.ingest.path
    if path and "://" not in path:
        path = os.path.join(directory, os.path.expanduser(path))
    uri = settings.tracking.uri and absolute_uri(settings.tracking.uri, directory)
    return replace(settings, ingest=replace(settings.ingest, path=path), tracking=replace(settings.tracking, uri=uri),
                   cache_dir=os.path.join(directory, os.path.expanduser(settings.cache_dir)))


def absolute_uri(uri: str, directory: str) -> str:
    """A tracking URI whose store is a relative path (sqlite:///mlflow.db, file:mlruns, ./mlruns) made absolute."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if uri.startswith(scheme):
            rest = uri.removeprefix(scheme)
            return uri if rest.startswith("/") else scheme + os.path.join(directory, rest)
    if uri == "databricks" or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):  # a server, not a folder
        return uri
    return os.path.join(directory, uri)  # MLflow reads a URI without a scheme as a local folder


def readable_here(settings: PipelineConfig) -> None:
    """A job whose data the driver resolved but this worker cannot read fails now, naming the path and
    the host (FileNotFoundError), rather than downloading it there: on another host than the driver's,
    or when the driver could read this very path."""
    path, driver, here = settings.ingest.path, os.environ.get(DRIVER_HOST), socket.gethostname()
    from pipeline.ingest import SOURCES

    if not driver or not SOURCES[settings.ingest.source].local or not path:
        return
    if (driver != here or path == os.environ.get(DRIVER_DATA)) and not os.access(path, os.R_OK):
        raise FileNotFoundError(
            f"ingest.path={path} cannot be read on host {here}, where this job runs (the sweep's driver on {driver} "
            "resolved it): make the data readable at that path on every worker (e.g. a shared file system), or "
            "point IMDB_ARCHIVE or ingest.path at a copy every worker can read")


def driver_environment(config: DictConfig) -> dict[str, str]:
    """The driver's variables that jobs resolve settings from: the ones the config reads (${oc.env:NAME},
    e.g. IMDB_ARCHIVE) and MLflow's client settings (MLFLOW_*: tracking URI, credentials, ...)."""
    read = set(READS_VARIABLE.findall(str(OmegaConf.to_container(config, resolve=False))))
    return {name: value for name, value in os.environ.items() if name in read or name.startswith("MLFLOW_")}


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent: str | None = None
        self.settings: PipelineConfig | None = None
        self.axes: dict[str, str] = {}
        self.on_ray, self.on_joblib, self.analysing, self.began = False, False, False, 0.0  # began: jobs' start
        self.warming = _nothing  # stops the worker that makes the jobs' data at the sweep's start (warm)

    def __getstate__(self) -> dict:  # (joblib's launcher sends the callbacks to its workers: not the data worker)
        return {**self.__dict__, "warming": _nothing}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import ingest
        from pipeline.tracking import sweeps

        hydra_cfg = config.hydra
        directory, self.began = os.getcwd(), time.time()  # (hydra.job.chdir is false: where the user ran the command)
        atexit.register(self._abandoned)  # (once the parent is open, the process's end ends it)
        try:
            self.settings = absolute(load(config), directory)
            ingest.check(self.settings.ingest)  # (a source and its path)
            search.check(hydra_cfg.sweeper)  # an Optuna search without Optuna (or bad settings): stop before the parent
            axes = sweep_axes(hydra_cfg)
            self.warming = warm(self.settings, axes, str(hydra_cfg.launcher.get("_target_", "")))
            self.parent, experiment_id, order = sweeps.open_sweep_parent(self.settings, axes, str(hydra_cfg.sweep.dir))
            axes = self.axes = {key: axes[key] for key in order}  # a resume names its jobs as the sweep did
        except Exception as error:  # Hydra would only warn and run the jobs untracked as a sweep: stop instead
            log.error("the sweep cannot start: %s", error)
            raise SystemExit(2) from error
        data = self.settings.ingest.path
        forwarded = {**driver_environment(config), PARENT_RUN: self.parent, EXPERIMENT: experiment_id,
                     AXES: json.dumps(list(axes)), RESUMING: "1" if self.settings.sweep.resume else "",
                     "MLFLOW_TRACKING_URI": absolute_uri(tracking_uri(self.settings.tracking), directory),
                     DIRECTORY: directory, DRIVER_HOST: socket.gethostname(),
                     DRIVER_DATA: data if data and os.access(data, os.R_OK) else ""}
        os.environ.update(forwarded)  # jobs in this process, and joblib or local Ray workers, inherit these
        if hydra_cfg.sweeper.get("_target_") == BASIC_SWEEPER and sharing():
            with open_dict(hydra_cfg.sweeper):  # (built from this config after the multirun starts: pipeline/budgets.py)
                hydra_cfg.sweeper._target_ = BUDGET_SWEEPER  # one training for the jobs that differ only in fit.epochs
        launcher = str(hydra_cfg.launcher.get("_target_", ""))
        self.on_ray, self.on_joblib = "ray" in launcher, "joblib" in launcher
        if self.on_ray:
            _forward_to_ray(hydra_cfg.launcher, forwarded)
        log.info("sweep over %s: parent MLflow run %s", ", ".join(f"{k}={v}" for k, v in axes.items()), self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import train
        from pipeline.tracking import sweeps

        if self.settings.sweep.early_stopping_reference:
            reference = replace(
                self.settings,
                fit=replace(self.settings.fit, early_stopping=replace(self.settings.fit.early_stopping, enabled=True)),
                tracking=replace(self.settings.tracking, run_name=reference_name(self.settings, self.axes)))
            try:  # (unless a job's training recorded it: pipeline/budgets.py)
                if finished_job(reference) is None and not sweeps.recorded_child(self.parent, reference, self.began):
                    CONSOLE.install(reference.verbose)  # the handlers again: Hydra has set logging up anew
                    train.train(reference)
            except Exception:  # recorded as a FAILED child; the analysis lists it
                log.exception("the early-stopping reference job failed")
        self.warming()
        self.analysing = True  # (an interrupt from here on stops the analysis, not a job)
        analysis, interrupted = analyze_sweep(self.parent, alias=self.settings.sweep.champion_alias)
        failed = len(analysis.failed)
        with SIGNALS.held():  # the parent ends FINISHED and is let go of, or neither
            sweeps.close_sweep_parent(self.parent, "FINISHED")
            self.parent = None
        for key in (PARENT_RUN, EXPERIMENT, AXES, RESUMING, DIRECTORY, DRIVER_HOST, DRIVER_DATA):
            os.environ.pop(key, None)
        log.info("sweep analysis: %d jobs finished, %d failed%s\n%s", len(analysis.table), failed,
                 f", {len(interrupted)} interrupted earlier and not run again" if interrupted else "", analysis.report)
        if failed:  # exit non-zero so that scripts notice (an exception here would only become a warning)
            log.error("%d sweep job(s) failed: %s; the others are recorded and analysed under the parent run",
                      failed, ", ".join(analysis.failed["job"]))
            raise SystemExit(1)

    def _abandoned(self) -> None:
        """The process is ending before the sweep did (Ctrl-C, SIGTERM, a crash): end the parent KILLED, let
        go of it and say, in one line, the command that resumes it (the user's own, plus sweep.resume). On Ray,
        the driver's end stops its jobs' workers, and with them the watchdogs they started (Ray kills a
        worker's child processes): once Ray is shut down, the children still RUNNING end KILLED here. Joblib alike:
        an interrupt of its call kills its workers' process trees (loky) before it reaches the driver."""
        SIGNALS.ended()
        self.warming()
        if self.parent:
            from pipeline.tracking import sweeps

            parent, self.parent = self.parent, None
            try:
                with SIGNALS.held():  # (a second Ctrl-C waits for the parent's end, then is dropped: see below)
                    if self.on_ray:
                        if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # (Ray's own atexit may have)
                            sys.modules["ray"].shutdown()  # the job ends: the cluster stops its workers
                        sweeps.end_running_children(parent, "its sweep's driver ended, and Ray stopped the job")
                    elif self.on_joblib:
                        sweeps.end_running_children(parent, "its sweep's driver ended, and joblib stopped the job's "
                                                            "worker process")
                    sweeps.close_sweep_parent(parent, "KILLED")
            except KeyboardInterrupt:  # the process is ending already: the second signal has nothing more to stop
                SIGNALS.ended()
            when = "during its analysis (every job had ended)" if self.analysing else "before its jobs did"
            print(f"sweep {parent} ended KILLED {when}; {'finish' if self.analysing else 'resume'} it with: "
                  f"{resume_command(sys.orig_argv, parent)}", file=sys.stderr, flush=True)


def warm(settings: PipelineConfig, axes, launcher: str):
    """When every job of the sweep reads the data `settings` read, on this machine: a worker that makes it now, into
    the stage cache, while the sweep opens its parent and plans (pipeline/speed/prepare_ahead.py). Returns the
    function that stops it."""
    if not settings.prepare_ahead:
        return _nothing
    from pipeline.speed import prepare_ahead
    from pipeline.train import prepare

    return prepare_ahead.sweep_worker(settings, axes, launcher, prepare) or _nothing


def _nothing() -> None:
    pass


def sharing() -> bool:
    """Whether Hydra knows pipeline.budgets.BudgetSweeper (installed with the project as hydra_plugins.pipeline_search)."""
    from hydra.core.plugins import Plugins

    return BUDGET_SWEEPER in Plugins.instance().class_name_to_class


def _forward_to_ray(launcher: DictConfig, variables: dict[str, str]) -> None:
    """Workers of a Ray cluster started elsewhere do not inherit this process's environment: pass the
    sweep's variables in the runtime environment that the Ray launcher gives ray.init. (The launcher is
    built from this same config after the multirun starts, so the change reaches it.) Joining a running
    cluster (init.address or RAY_ADDRESS), ray.init refuses an object store size, which
    hydra-ray-launcher 1.2 sets when none is given (Hydra issue #2893): there, none is given explicitly."""
    with open_dict(launcher):
        init = launcher.ray.init
        joining = (init.get("address") or os.environ.get("RAY_ADDRESS")) not in (None, "", "local")
        if joining and "object_store_memory" not in init:
            init.object_store_memory = None  # the cluster's own
        existing = init.get("runtime_env")
        runtime_env = OmegaConf.to_container(existing, resolve=True) if existing is not None else {}
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **variables}
        init.runtime_env = runtime_env


def analyze_sweep(parent_run_id: str, alias: str | None = None):
    """The sweep's children read back, analysed along its own axes (pipeline.analysis, pure), and the analysis
    written to the parent; with `alias`, the best job's registered model version gets it. Returns the Analysis
    and the jobs interrupted (KILLED) and not finished since: neither finished nor failed, the report says so."""
    from pipeline import analysis
    from pipeline.tracking import sweeps

    axes, jobs, histories, failed, early, interrupted = sweeps.read_jobs(parent_run_id, analysis.BUDGET)
    result = analysis.analyze(axes, [analysis.job_row(**job) for job in jobs], histories, failed, early)
    if interrupted:
        result.report += ("\n## Interrupted jobs\n\nEnded KILLED (Ctrl-C, SIGTERM, or their process ended) and not run "
                          "since (an Optuna search runs a new trial in place of an interrupted one):\n\n"
                          + "".join(f"- {job['job']} (run {job['run_id']}): {job['error']}\n" for job in interrupted))
    sweeps.write_analysis(parent_run_id, result, early, alias)
    return result, interrupted


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.sweep PARENT_RUN_ID`: run the analysis again for a finished sweep."""
    import argparse

    from pipeline import tracking

    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=main.__doc__)
    parser.add_argument("parent_run_id", help="the sweep's parent run (its id in the MLflow UI)")
    parser.add_argument("--alias", default=None, help="also point this registered-model alias at the best job")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    tracking.use(args.tracking_uri)
    analysis, _ = analyze_sweep(args.parent_run_id, alias=args.alias)
    print(analysis.report)


if __name__ == "__main__":
    main()
