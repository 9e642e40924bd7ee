"""`python -m pipeline [overrides]`: the Hydra entry point, kept thin.

It composes conf/, validates it into a PipelineConfig and calls pipeline.train.train; the return value
(the best validation accuracy) is what a Hydra sweeper optimizes. In a sweep a failed job returns NaN
instead of raising, so that the other jobs run; its child run records the error. `--overrides "a=1 b=2"`
takes the overrides as one string, which is how `mlflow run` passes them (see MLproject).
"""

from __future__ import annotations

import gc
import logging
import os
import shlex
import sys

from pipeline.signals import SIGNALS

# From the first moment, Ctrl-C and SIGTERM wait until the run is open, then end it KILLED.
SIGNALS.install(held=True)
# The libraries' imports make millions of objects and no garbage: no collection until TensorFlow is
# loaded, when train() freezes what is there and turns collection on again (freeze_gc).
gc.disable()

import hydra  # noqa: E402 - after the handlers, so that a Ctrl-C during the imports is not lost
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import config, search, sweep  # noqa: E402
from pipeline.console import CONSOLE  # noqa: E402

sweep.register()
search.register()  # hydra/sweeper=optuna: our sweeper (pipeline/search.py), also from an editable install
log = logging.getLogger("pipeline")


def ready(settings: config.PipelineConfig) -> config.PipelineConfig:
    """A job's settings, once loaded: its console, and collection back on unless freeze_gc."""
    CONSOLE.install(settings.verbose)
    if not settings.freeze_gc:
        gc.enable()
    return settings


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from pipeline.train import train

    if not os.environ.get(config.PARENT_RUN):  # a single run
        metrics, _ = train(ready(config.load(cfg)))
        return metrics.get("val_accuracy")
    job, overrides = HydraConfig.get().job, list(HydraConfig.get().overrides.task)
    try:
        settings = ready(sweep.child_settings(config.load(cfg), overrides, job.num))
    except (ValueError, FileNotFoundError) as error:  # invalid settings, or data this worker cannot read:
        from pipeline.tracking import sweeps  # a FAILED child that says why, at once

        name = sweep.child_name(overrides, job.num)
        log.error("sweep job %s (%s): %s", job.num, name, error)
        sweeps.record_failed_job(name, error)
        return float("nan")
    previous = sweep.finished_job(settings)
    if previous is not None:  # resuming a sweep: this job already finished under the parent
        log.info("sweep job %s (%s) already finished as run %s; not run again", job.num,
                 settings.tracking.run_name, previous["run_id"])
        return previous["val_accuracy"]
    try:
        metrics, _ = train(settings)
    except Exception:  # one failed job must not stop the sweep: its child run is FAILED with the error
        log.exception("sweep job %s (%s) failed", job.num, settings.tracking.run_name)
        return float("nan")
    return metrics.get("val_accuracy", float("nan"))


def expand_overrides(argv: list[str]) -> list[str]:
    if "--overrides" not in argv:
        return argv
    at = argv.index("--overrides")
    if at + 1 >= len(argv):
        raise SystemExit("--overrides needs a value, e.g. --overrides 'fit.epochs=20 build.hidden_units=32'")
    return argv[:at] + shlex.split(argv[at + 1]) + argv[at + 2:]


if __name__ == "__main__":
    sys.argv = expand_overrides(sys.argv)
    try:
        main()
    except KeyboardInterrupt:
        SIGNALS.ended()  # the signal has reached the top: the process ends on it, nothing sends it again
        raise
