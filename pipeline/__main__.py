"""`python -m pipeline [overrides]`: the Hydra entry point, kept thin.

It composes conf/, validates it into a PipelineConfig and calls pipeline.runner.run; the return value
(the best validation accuracy) is what a Hydra sweeper optimizes. In a sweep a failed job returns
NaN instead of raising, so that the other jobs run; its child run records the error. `--overrides "a=1 b=2"` takes the overrides as
one string, which is how `mlflow run` passes them (see MLproject).
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import sys
import threading

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline import config

config.register()
log = logging.getLogger("pipeline")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline import runner, sweep

    if not sweep.in_sweep():
        metrics, _ = runner.run(config.load(cfg))
        return metrics.get("val_accuracy")
    job, overrides = HydraConfig.get().job, list(HydraConfig.get().overrides.task)
    try:
        settings = sweep.child_settings(config.load(cfg), overrides, job.num)
    except ValueError as error:  # a job whose settings are invalid is recorded as a failed child
        from pipeline import tracking

        name = sweep.child_name(overrides, job.num)
        log.error("sweep job %s (%s): %s", job.num, name, error)
        tracking.record_failed_job(name, error)
        return float("nan")
    previous = sweep.finished_job(settings)
    if previous is not None:  # resuming a sweep: this job already finished under the parent
        log.info("sweep job %s (%s) already finished as run %s; not run again", job.num,
                 settings.tracking.run_name, previous["run_id"])
        return previous["val_accuracy"]
    try:
        metrics, _ = runner.run(settings)
    except Exception:  # one failed job must not stop the sweep: its child run is FAILED with the error
        log.exception("sweep job %s (%s) failed", job.num, settings.tracking.run_name)
        return float("nan")
    return metrics.get("val_accuracy", float("nan"))


def _expand_overrides(argv: list[str]) -> list[str]:
    if "--overrides" not in argv:
        return argv
    at = argv.index("--overrides")
    if at + 1 >= len(argv):
        raise SystemExit("--overrides needs a value, e.g. --overrides 'fit.epochs=20 build.hidden_units=32'")
    return argv[:at] + shlex.split(argv[at + 1]) + argv[at + 2:]


def _leave() -> None:
    """Exit without the interpreter's teardown. By now every run has ended and every store write has
    returned; what remains is unloading TensorFlow module by module, about 2 s of every run. Exit
    handlers run as usual. With worker threads still alive (a parallel launcher's pool), the
    interpreter's own shutdown stops them in its order instead."""
    if any(thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
           for thread in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.argv = _expand_overrides(sys.argv)
    main()  # errors leave through Hydra's own exit (status 1), with the usual teardown
    _leave()
