"""Hydra's side of the pipeline: the typed schema, and a multirun as one parent run with a child per job.

`register()` puts the PipelineConfig schema in Hydra's ConfigStore, so that every YAML value is
type-checked. SweepCallback (named in conf/config.yaml) acts in multirun mode: it opens the parent run
(or adopts the one `mlflow run` created), hands its id to the jobs through the environment (inherited
by joblib and Ray workers) and, when they are done, runs the early-stopping reference job if asked,
writes the analysis to the parent and ends it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from dataclasses import replace
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import search
from pipeline.config import EXPERIMENT, PARENT_RUN, PipelineConfig, load, tracking_uri
from pipeline.console import CONSOLE
from pipeline.signals import SIGNALS

log = logging.getLogger(__name__)
AXES = "PIPELINE_SWEEP_AXES"
RESUMING = "PIPELINE_SWEEP_RESUMING"


def register() -> None:
    """Register the schema so that conf/config.yaml (and every group option) is type-checked."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


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


def finished_job(settings: PipelineConfig) -> dict | None:
    """When resuming a sweep: the job's earlier FINISHED child run under the parent, if there is one."""
    if not os.environ.get(RESUMING):
        return None
    from pipeline.tracking import sweeps

    return sweeps.finished_child(os.environ[PARENT_RUN], settings.tracking.run_name)


def child_name(task_overrides: list[str], job_number: int) -> str:
    return job_name(task_overrides, json.loads(os.environ.get(AXES, "[]"))) or f"job-{job_number}"


def child_settings(settings: PipelineConfig, task_overrides: list[str], job_number: int) -> PipelineConfig:
    """A job's settings with its run name (what differs) when it runs inside a sweep."""
    name = settings.tracking.run_name or child_name(task_overrides, job_number)
    return replace(settings, tracking=replace(settings.tracking, run_name=name))


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.parent: str | None = None
        self.settings: PipelineConfig | None = None
        self.on_ray = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.tracking import sweeps

        hydra_cfg = config.hydra
        try:
            self.settings = load(config)
            search.check(hydra_cfg.sweeper)  # an Optuna search without Optuna (or bad settings): stop before the parent
            axes = sweep_axes(hydra_cfg)
            self.parent, experiment_id = sweeps.open_sweep_parent(self.settings, axes, str(hydra_cfg.sweep.dir))
        except Exception as error:  # Hydra would only warn and run the jobs untracked as a sweep: stop instead
            log.error("the sweep cannot start: %s", error)
            raise SystemExit(2) from error
        forwarded = {PARENT_RUN: self.parent, EXPERIMENT: experiment_id, AXES: json.dumps(list(axes)),
                     RESUMING: "1" if self.settings.sweep.resume else "",
                     "MLFLOW_TRACKING_URI": tracking_uri(self.settings.tracking)}
        os.environ.update(forwarded)  # jobs in this process, and joblib or local Ray workers, inherit these
        self.on_ray = "ray" in str(hydra_cfg.launcher.get("_target_", ""))
        if self.on_ray:
            _forward_to_ray(hydra_cfg.launcher, forwarded)
        atexit.register(self._abandoned)
        log.info("sweep over %s: parent MLflow run %s", ", ".join(f"{k}={v}" for k, v in axes.items()), self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import train
        from pipeline.tracking import sweeps

        if self.settings.sweep.early_stopping_reference:
            reference = replace(
                self.settings,
                fit=replace(self.settings.fit, early_stopping=replace(self.settings.fit.early_stopping, enabled=True)),
                tracking=replace(self.settings.tracking, run_name=f"early_stopping,hidden_units={self.settings.build.hidden_units}"))
            try:
                if finished_job(reference) is None:
                    CONSOLE.install(reference.verbose)  # the handlers again: Hydra has set logging up anew
                    train.train(reference)
            except Exception:  # recorded as a FAILED child; the analysis lists it
                log.exception("the early-stopping reference job failed")
        analysis = sweeps.analyze_sweep(self.parent, alias=self.settings.sweep.champion_alias)
        failed = len(analysis.failed)
        sweeps.close_sweep_parent(self.parent, "FINISHED")
        self.parent = None
        for key in (PARENT_RUN, EXPERIMENT, AXES, RESUMING):
            os.environ.pop(key, None)
        log.info("sweep analysis: %d jobs finished, %d failed\n%s", len(analysis.table), failed, analysis.report)
        if failed:  # exit non-zero so that scripts notice (an exception here would only become a warning)
            log.error("%d sweep job(s) failed: %s; the others are recorded and analysed under the parent run",
                      failed, ", ".join(analysis.failed["job"]))
            raise SystemExit(1)

    def _abandoned(self) -> None:
        """The process is ending before the sweep did (Ctrl-C, SIGTERM, a crash): end the parent KILLED.
        On Ray, the driver's end stops its jobs' workers, and with them the watchdogs they started (Ray
        kills a worker's child processes): once Ray is shut down, the children still RUNNING end KILLED here."""
        SIGNALS.ended()
        if self.parent:
            from pipeline.tracking import sweeps

            with SIGNALS.held():
                if self.on_ray:
                    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # (Ray's own atexit may have)
                        sys.modules["ray"].shutdown()  # the job ends: the cluster stops its workers
                    sweeps.end_running_children(self.parent, "its sweep's driver ended, and Ray stopped the job")
                sweeps.close_sweep_parent(self.parent, "KILLED")


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


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.sweep PARENT_RUN_ID`: run the analysis again for a finished sweep."""
    import argparse

    from pipeline import tracking
    from pipeline.tracking import sweeps

    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=main.__doc__)
    parser.add_argument("parent_run_id", help="the sweep's parent run (its id in the MLflow UI)")
    parser.add_argument("--alias", default=None, help="also point this registered-model alias at the best job")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    tracking.use(args.tracking_uri)
    analysis = sweeps.analyze_sweep(args.parent_run_id, alias=args.alias)
    print(analysis.report)


if __name__ == "__main__":
    main()
