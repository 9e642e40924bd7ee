"""A search trial's side of pruning: each epoch reported to its Optuna trial, training stopped when pruned.

`report_to_study(cfg.sweep)` gives the fit a Keras callback when this job is a trial of an Optuna search
(pipeline/search.py, the Hydra sweeper, launched it with `sweep.trial/study/storage`), and no callback
otherwise. It imports neither Hydra nor OmegaConf, so `train` (and a notebook) loads no Hydra; Optuna is
imported only when a trial runs (the `search` extra).
"""

from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path
from typing import Any, Optional

from pipeline import config

log = logging.getLogger(__name__)
INSTALL = "pip install 'imdb-pipeline[search]' (in the project's checkout: pip install -e '.[search]')"
# What each epoch reports: the curve whose best value the job returns (main() maximizes val_accuracy).
# Optuna's pruners compare reported values in the study's direction, so a maximized study must not get val_loss.
MONITOR = "val_accuracy"
PRUNERS = {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner", "none": "NopPruner"}
PRUNER_ATTR = "pipeline.pruner"  # the study's user attribute that tells each job which pruner judges it
PRUNED_ATTR = "pruned_at_epoch"  # the trial's user attribute a job sets when its pruner stopped it


def require_optuna():
    """The optuna module, or an ImportError that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise ImportError(f"an Optuna search (hydra/sweeper=optuna) needs Optuna, which is not installed: "
                          f"{INSTALL}") from None
    return optuna


def make_pruner(optuna, name: Optional[str], arguments: dict[str, Any]):
    """The Optuna pruner named by hydra.sweeper.pruner, with that pruner's arguments."""
    name = name or "none"
    if name not in PRUNERS:
        raise ValueError(f"hydra.sweeper.pruner={name!r} is not allowed: one of {', '.join(PRUNERS)}")
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**arguments)
    except TypeError as error:
        raise ValueError(f"hydra.sweeper.pruners.{name}={arguments}: {error}") from None


@functools.lru_cache(maxsize=None)
def _storage(url: str):
    """One connection pool per storage and process (a process may run many trials)."""
    return require_optuna().storages.RDBStorage(url)


def report_to_study(settings: config.SweepConfig) -> list:
    """The fit's callbacks when this job is a search trial (none otherwise): each epoch's val_accuracy is
    reported to the trial, and training stops when the study's pruner prunes it; the run is tagged with
    search.trial and search.pruned. The trial is built with its documented constructor, Trial(study, id)."""
    if settings.trial is None:
        return []
    import keras

    optuna = require_optuna()
    from pipeline.tracking import sweeps

    database = settings.storage.split("?", 1)[0].removeprefix("sqlite:///")
    if settings.storage.startswith("sqlite:///") and not Path(database).exists():  # a worker of another machine
        raise FileNotFoundError(f"the Optuna study's file {database} is not on {socket.gethostname()}: give "
                                "hydra.sweeper.storage a database URL that every worker reaches (docs/search.md)")
    storage = _storage(settings.storage)
    study_id = storage.get_study_id_from_name(settings.study)
    chosen = storage.get_study_user_attrs(study_id).get(PRUNER_ATTR, {})
    pruner = make_pruner(optuna, chosen.get("name"), chosen.get("arguments", {}))
    study = optuna.load_study(study_name=settings.study, storage=storage, pruner=pruner)
    trial_id, number = storage.get_trial_id_from_study_id_trial_number(study_id, settings.trial), settings.trial
    if storage.get_trial(trial_id).state.is_finished():  # a trial's settings run again by hand, outside its search
        log.warning("trial %d of study %s has ended: this run does not report to it", number, settings.study)
        return []
    trial = optuna.trial.Trial(study, trial_id)

    class ReportToStudy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            sweeps.tag_search({"search.trial": str(number), "search.pruned": "false"}, active=True)

        def on_epoch_end(self, epoch, logs=None):
            trial.report(float(logs[MONITOR]), step=epoch + 1)
            if trial.should_prune():
                trial.set_user_attr(PRUNED_ATTR, epoch + 1)
                sweeps.tag_search({"search.pruned": "true"}, active=True)
                log.info("trial %d pruned after epoch %d (%s %.4f): the %s pruner stops it", number, epoch + 1,
                         MONITOR, logs[MONITOR], chosen.get("name"))
                self.model.stop_training = True

    return [ReportToStudy()]
