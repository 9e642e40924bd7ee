"""`python -m pipeline [overrides]`: the Hydra entry point, kept thin.

It composes conf/ (config.CONF), validates it into a PipelineConfig and calls pipeline.train.train; the return value
(the best validation accuracy) is what a Hydra sweeper optimizes. In a sweep a failed job returns NaN
instead of raising, so that the other jobs run; its child run records the error. `--overrides "a=1 b=2"`
takes the overrides as one string, which is how `mlflow run` passes them (see MLproject).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shlex
import signal
import sys
import traceback

import pipeline
from pipeline.speed.collection import COLLECTION
from pipeline.signals import SIGNALS

if __name__ == "__main__":  # the command line owns its process: set up before the libraries load
    pipeline.COMMAND_LINE = True  # its first run starts with the process (pipeline.STARTED)
    SIGNALS.install()  # Ctrl-C and SIGTERM end the run KILLED; before a run is open they just stop the program
    COLLECTION.pause()  # until TensorFlow is loaded (freeze_gc), or the settings say freeze_gc=false
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact clutters logs
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra hands errors on; the end of this file reports them


def stopped(error: KeyboardInterrupt) -> None:
    """The process ends on an interrupt: one line (the run's end said what it kept; a sweep's says, as the
    process ends, what its parent kept), exit 128 + the signal."""
    SIGNALS.ended()  # the signal has reached the top: nothing sends it again
    signum = getattr(error, "signum", signal.SIGINT)
    said, cause = False, error
    while cause is not None and not said:  # a second Ctrl-C that came while a run ended on the first: said
        said, cause = getattr(cause, "reported", False), cause.__context__
    settings = sys.modules.get("pipeline.config")
    sweeping = bool(getattr(settings, "PARENT_RUN", None) and os.environ.get(settings.PARENT_RUN))
    if not (said or sweeping):  # no run was open: nothing recorded
        print(f"{signal.Signals(signum).name}: stopped before a run was recorded", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


try:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from pipeline import budgets, config, search
    from pipeline.console import CONSOLE
except BaseException as error:  # a Ctrl-C while the libraries load (C code may turn it into an error of its own)
    if (interrupt := SIGNALS.behind(error)) is None:
        raise
    stopped(interrupt)

config.register()
search.register()  # hydra/sweeper=optuna: our sweeper (pipeline/search.py), also from an editable install
log = logging.getLogger("pipeline")


# What a user can get wrong (a setting, a path, the tracking server): its message, once, without a traceback
# (the run's logs/run.log keeps it; verbose=true shows it).
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError, CompactHydraException,
               OmegaConfBaseException)
FAILED: list[BaseException] = []  # the single run's user error, if any


def report(error: BaseException) -> None:
    message = str(error)
    if isinstance(error, OSError) and error.filename and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        # (Hydra making its output folder: the one writer whose path the settings' own checks do not name)
        message = (f"cannot write {os.path.abspath(error.filename)} ({error.strerror}): run from a folder you can "
                   "write, or set hydra.run.dir (hydra.sweep.dir in a sweep) to one")
    if isinstance(error, CompactHydraException) and isinstance(error.__cause__, OmegaConfBaseException):
        message += f"\n{error.__cause__}"  # (what Hydra itself prints for a config error)
    if getattr(CONSOLE, "verbose", "verbose=true" in sys.argv):
        traceback.print_exception(error)
    else:
        print(f"{type(error).__name__}: {message}", file=sys.stderr, flush=True)


def reported(task):
    """A single run's user error becomes the task's outcome, reported once by the end of this file (raised
    through Hydra, it would come after a line listing every override). A sweep's jobs handle their own."""
    @functools.wraps(task)
    def job(cfg):
        try:
            return task(cfg)
        except USER_ERRORS as error:
            if os.environ.get(config.PARENT_RUN):
                raise
            FAILED.append(error)
            return None

    return job


def ready(settings: config.PipelineConfig) -> config.PipelineConfig:
    """A job's settings, once loaded: its console, and collection back on unless freeze_gc."""
    CONSOLE.install(settings.verbose)
    if not settings.freeze_gc:
        COLLECTION.resume(freeze=False)
    return settings


@hydra.main(version_base="1.3", config_path=str(config.CONF), config_name="config")  # (a wheel: inside the package)
@reported
def main(cfg: DictConfig) -> float | None:
    from pipeline import tracking  # noqa: F401 (MLflow and its log handler, before the console calms it)
    from pipeline.train import train

    if not os.environ.get(config.PARENT_RUN):  # a single run
        metrics, _ = train(ready(config.load(cfg)))
        return metrics.get("val_accuracy")
    job, overrides = HydraConfig.get().job, list(HydraConfig.get().overrides.task)
    return budgets.sweep_job(cfg, overrides, job.num, ready)  # (one training for several fit.epochs: budgets.py)


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
    except USER_ERRORS as error:  # a config error, found before the job
        FAILED.append(error)
    except BaseException as error:  # an interrupt, or an error C code made of one (SIGNALS.behind)
        if (interrupt := SIGNALS.behind(error)) is None:
            raise
        stopped(interrupt)
    if FAILED:
        if (interrupt := SIGNALS.behind(FAILED[0])) is not None:  # (a user error that came of an interrupt)
            stopped(interrupt)
        report(FAILED[0])
        sys.exit(1)
