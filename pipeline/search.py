"""Guided search on Optuna's ask/tell API: a Hydra sweeper, and each trial's side of pruning (docs/search.md).

OptunaSweeper (conf/hydra/sweeper/optuna.yaml) reads `hydra.sweeper.params` and the command line's sweeps
(choice, range, interval, tag(log, interval)) as Optuna distributions, asks a persistent study for trials,
n_jobs at a time, launches each as a Hydra job with `sweep.trial/study/storage` and tells the study how it
ended: COMPLETE, PRUNED or FAIL. The same command resumes the study, running only the trials it still lacks.
In the job, `pipeline.trial.report_to_study` gives the fit a Keras callback that reports each epoch to the
trial and stops training when the study's pruner says so (kept apart: it needs no Hydra). Optuna is imported
only when a search runs (the `search` extra).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from pipeline import config
from pipeline.trial import PRUNED_ATTR, PRUNER_ATTR, PRUNERS, make_pruner, require_optuna

log = logging.getLogger(__name__)


def register() -> None:
    """Make the sweepers (this one, and pipeline.budgets') known to Hydra where its scan of the hydra_plugins folders
    misses them: under `pip install -e .` the namespace holds an import hook, not a folder (public API: Plugins.register).
    Without the project installed (pyproject.toml maps pipeline/hydra_plugin there) there is nothing to register."""
    try:
        from hydra_plugins.pipeline_search import BudgetSweeper, OptunaSweeper
    except ImportError:
        return
    Plugins.instance().register(OptunaSweeper)
    Plugins.instance().register(BudgetSweeper)


def check(sweeper: DictConfig) -> None:
    """Before a sweep opens its parent run: if it is this Optuna search, that Optuna is installed and the
    sweeper's settings (numbers, pruner and its arguments, the search space) are usable."""
    if str(sweeper.get("_target_", "")).endswith(".pipeline_search.OptunaSweeper"):
        optuna = require_optuna()
        searching = OptunaSweeper(**{key: value for key, value in sweeper.items() if not str(key).startswith("_")})
        make_pruner(optuna, searching.pruner, searching.pruner_arguments)
        search_space([f"{key}={value}" for key, value in (searching.params or {}).items()])


def storage_url(storage: Optional[str], tracking_uri: str) -> str:
    """Where the study is kept: hydra.sweeper.storage as a database URL, or a file path for a SQLite file;
    by default optuna.db beside a SQLite tracking store (mlflow.db), else in the working directory."""
    if storage and "://" in storage:
        return storage
    if storage:
        return f"sqlite:///{Path(storage).resolve()}"
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.split("?", 1)[0].removeprefix("sqlite:///")).resolve().parent
    else:
        folder = Path.cwd()
    return f"sqlite:///{folder / 'optuna.db'}"


def distribution(override: Override):
    """A swept override as an Optuna distribution: choice -> categorical; range -> int (or float) with its
    step; interval -> uniform float over [start, end] (Hydra reads its ends as floats), tag(log, ...) log-uniform."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, line = override.value(), override.input_line
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{line}: the range is empty; e.g. range(8, 65, 8) gives 8, 16, ..., 64")
        whole = all(isinstance(v, int) for v in (value.start, value.stop, value.step))
        kind = IntDistribution if whole else FloatDistribution
        return kind(values[0], values[0] + value.step * (len(values) - 1), step=value.step)
    if override.is_interval_sweep():
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    raise ValueError(f"{line}: an Optuna search takes choice(...), range(...), interval(...) or "
                     "tag(log, interval(...)), e.g. build.learning_rate=tag(log, interval(0.0003, 0.01))")


def search_space(written: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The swept keys' distributions, and the plain overrides every trial gets (a later entry wins)."""
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(written):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line
    return space, list(fixed.values())


def as_in_study(space: dict[str, Any], trials) -> dict[str, Any]:
    """The search space with each distribution as the study's first trials recorded it, where that one draws
    the same values (choice(16, 8) for choice(8, 16); range(8, 17, 8) for choice(8, 16)): Optuna refuses a
    parameter's choices in another order, or another kind of distribution, and it is the same search."""
    recorded = {key: kept for trial in reversed(trials) for key, kept in trial.distributions.items()}
    return {key: recorded[key] if key in recorded and _values(asked) is not None
            and _values(asked) == _values(recorded[key]) else asked for key, asked in space.items()}


def _values(distribution) -> list[str] | None:
    """The values a distribution draws from, sorted, if it draws from a list of them."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return sorted(map(repr, distribution.choices))
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return sorted(map(repr, range(distribution.low, distribution.high + 1, distribution.step)))
    return None


def _quoted(text: str) -> str:
    """A string as a Hydra override's value, whatever characters it holds (a URL's colons, slashes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class OptunaSweeper(Sweeper):
    """Optuna's ask/tell as a Hydra sweeper (docs/search.md); Hydra knows it under the name register() gives."""

    def __init__(self, direction: str = "maximize", study_name: str = "imdb-sentiment", storage: Optional[str] = None,
                 n_trials: int = 20, n_jobs: int = 1, sampler: Optional[DictConfig] = None, pruner: Optional[str] = "median",
                 pruners: Optional[DictConfig] = None, params: Optional[DictConfig] = None) -> None:
        for setting, number in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if not isinstance(number, int) or number < 1:
                raise ValueError(f"hydra.sweeper.{setting}={number!r} is not allowed: use a whole number above 0")
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r} is not allowed: maximize or minimize")
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs, self.sampler, self.params = n_trials, n_jobs, sampler, params
        self.pruner = pruner or "none"
        if self.pruner not in PRUNERS:
            raise ValueError(f"hydra.sweeper.pruner={self.pruner!r} is not allowed: one of {', '.join(PRUNERS)}")
        chosen = (pruners or {}).get(self.pruner)
        self.pruner_arguments = OmegaConf.to_container(chosen, resolve=True) if chosen is not None else {}
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list:
        optuna = require_optuna()
        from hydra.utils import instantiate
        from optuna.trial import TrialState

        from pipeline.tracking import sweeps

        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        space, fixed = search_space(params + list(arguments))
        if not space:
            raise ValueError("hydra.sweeper.params: nothing to search; give e.g. build.hidden_units: choice(8, 16, 32)")
        storage = storage_url(self.storage, config.tracking_uri(config.load(self.config).tracking))
        pruner = make_pruner(optuna, self.pruner, self.pruner_arguments)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
        existing = optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                       load_if_exists=True).get_trials(deepcopy=False)
        # A resumed study must not draw its first trials again: a seeded sampler goes on from seed + trials so far
        sampler = OmegaConf.to_container(self.sampler or {"_target_": "optuna.samplers.TPESampler"}, resolve=True)
        if sampler.get("seed") is not None:
            sampler["seed"] += len(existing)
        study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=instantiate(sampler), pruner=pruner)
        study.set_user_attr(PRUNER_ATTR, {"name": self.pruner, "arguments": self.pruner_arguments})
        space = as_in_study(space, existing)
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # Left RUNNING by a search that was stopped (Ctrl-C, a crash): a new trial takes its place.
            log.warning("trial %d of study %s was interrupted in an earlier search: marked FAIL in the study (Optuna "
                        "has no state for an interrupted trial); a new trial runs in its place", stale.number,
                        self.study_name)
            study.tell(stale.number, state=TrialState.FAIL)
        before = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        to_go = max(self.n_trials - before, 0)
        log.info("Optuna study %s in %s: %d of %d trials done, %d to run (pruner: %s)", self.study_name,
                 config.redact("storage", storage), before, self.n_trials, to_go, self.pruner)
        sweeps.tag_search({"search.study": self.study_name, "search.storage": config.redact("storage", storage),
                           "search.pruner": self.pruner, "search.trials_before": str(before)})
        if not to_go:
            log.info("nothing to run: the study has its %d trials; raise hydra.sweeper.n_trials for more, or name a "
                     "new study with hydra.sweeper.study_name", self.n_trials)
        identity = [f"sweep.study={_quoted(self.study_name)}", f"sweep.storage={_quoted(storage)}"]
        returns, ended = [], {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        while to_go > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, to_go))]
            batch = [tuple(fixed + [f"{key}={value}" for key, value in trial.params.items()]
                           + [f"sweep.trial={trial.number}"] + identity) for trial in trials]
            launched = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(launched)
            for trial, job in zip(trials, launched):
                ended[self._tell(study, trial.number, job)] += 1
            returns.extend(launched)
            to_go -= len(trials)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        sweeps.tag_search({"search.trials": str(done), "search.pruned_trials": str(ended["PRUNED"])})
        log.info("Optuna study %s: %d completed, %d pruned, %d failed in this search; %d of %d trials done",
                 self.study_name, ended["COMPLETE"], ended["PRUNED"], ended["FAIL"], done, self.n_trials)
        self._save_best(study)
        return returns

    def _tell(self, study, number: int, job) -> str:
        """Tell the study how trial `number` ended: FAIL (no value: the job failed), PRUNED (its pruner
        stopped it: the job set the trial's pruned_at_epoch) or COMPLETE with the job's value."""
        from optuna.trial import TrialState

        try:
            value = float(job.return_value)  # a job that raised raises here
        except Exception as error:
            log.warning("trial %d failed: %s", number, error)
            value = math.nan
        if math.isnan(value):
            study.tell(number, state=TrialState.FAIL)
            return "FAIL"
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if PRUNED_ATTR in trial.user_attrs:
            study.tell(number, state=TrialState.PRUNED)
            return "PRUNED"
        study.tell(number, value)
        return "COMPLETE"

    def _save_best(self, study) -> None:
        """optimization_results.yaml in the sweep folder, as Hydra's sweepers write it: the best trial so far."""
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return
        best = study.best_trial
        folder = Path(str(self.config.hydra.sweep.dir))
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": self.study_name, "best_trial": best.number,
                                         "best_params": best.params, "best_value": best.value}),
                       folder / "optimization_results.yaml")
