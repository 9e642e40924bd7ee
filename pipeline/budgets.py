"""A sweep over fit.epochs trains each other setting once: which jobs share a training, and the job that runs it.

With the same seed and data, a job's first N epochs do not depend on its budget (nothing in the fit reads
fit.epochs but the loop's count), so the jobs of a grid that differ only in fit.epochs hold one training: the
longest. BudgetSweeper (Hydra's basic sweeper, which pipeline.sweep swaps it for; a job the grid asks twice runs once)
launches one job per such group, its longest budget's, telling it the group's budgets (the variable BUDGETS, set
through hydra.job.env_set); `sweep_job` trains once and records every budget as its own child run, as a job of that
budget alone would have recorded it (pipeline/tracking/budgets.py). The unit of work a launcher (in-process, joblib,
Ray) runs is then the shared training. A group trains separately, with a line that says why, when something reads
the budget: early stopping, an Optuna trial, a setting that differs between its budgets (an interpolation of
fit.epochs), or when its settings do not compose (each job then fails on its own, as before). The sweep's
early-stopping reference job (sweep.early_stopping_reference), when a shared group's settings are its own but for
early stopping and a longest budget at least its fit.epochs, is recorded from that group's training (the variable
REFERENCE: its fit.epochs; tracking/budgets.py), not trained again after the sweep.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pipeline import config, sweep
from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)
BUDGETS = "PIPELINE_SWEEP_BUDGETS"  # in a shared job: the group's fit.epochs values as written, comma-separated
REFERENCE = "PIPELINE_SWEEP_REFERENCE"  # in a shared job: the early-stopping reference's fit.epochs, to record it too
KEY = "fit.epochs"
SAME = ("fit.epochs", "tracking.run_name")  # what may differ between the jobs of one training


def why_not(settings: PipelineConfig) -> Optional[str]:
    """Why jobs with these settings (but for fit.epochs) cannot share one training; None: they can."""
    if not settings.sweep.share_budgets:
        return "sweep.share_budgets=false"
    if settings.fit.early_stopping.enabled:
        return "fit.early_stopping.enabled=true (early stopping reads the budget: a fit may stop before it)"
    if settings.sweep.trial is not None:
        return "an Optuna trial (its pruner judges each epoch)"
    if "fit" not in settings.stages:
        return f"stages={list(settings.stages)} trains nothing"
    return None


def budget_of(overrides: Sequence[str]) -> Optional[str]:
    """The value of fit.epochs among a job's overrides, as written (None: the job does not set it)."""
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group == KEY and not override.is_sweep_override():
            return override.input_line.split("=", 1)[1]
    return None


def with_budget(overrides: Sequence[str], budget: str) -> list[str]:
    """A job's overrides with fit.epochs set to `budget` (the override as it was written, its value replaced)."""
    return [f"{line.split('=', 1)[0]}={budget}" if budget_of([line]) is not None else line for line in overrides]


def plan(jobs: Sequence[Sequence[str]], compose: Callable[[list[str]], PipelineConfig],
         reference: Optional[PipelineConfig] = None,
         finished: Callable[[PipelineConfig, list[str]], bool] = lambda settings, job: False) -> list[list[str]]:
    """The jobs to launch: each group of jobs that differ only in fit.epochs (and may share) as its longest
    budget's job with BUDGETS set; every other job as it is. `compose(overrides)`: that job's settings (raises if
    they do not compose or are invalid). `reference`: the sweep's early-stopping reference job, recorded by the first
    shared group it is a job of (REFERENCE set). `finished(settings, job)`: whether a resume finds the job finished
    (sweep_job does not run it again). Logs one line for each group: what it trains, or why it does not share."""
    asked: dict[tuple, int] = {}  # each job, and how many times the sweep asks it (a value given twice on an axis)
    for job in jobs:
        asked[tuple(job)] = asked.get(tuple(job), 0) + 1
    for job, times in asked.items():
        if times > 1:
            log.info("sweep: %s is asked %d times: it runs once (the same settings and seed give the same run)",
                     " ".join(job), times)
    order: list = []  # a job (a list) or a group (its overrides but fit.epochs, a tuple), in the sweep's order
    groups: dict[tuple, dict[int, tuple[str, list[str]]]] = {}
    for job in map(list, asked):
        written = budget_of(job)
        budget = int(written) if written is not None and written.strip().isdigit() else None
        if budget is None:
            order.append(job)
            continue
        others = tuple(line for line in job if budget_of([line]) is None)
        if others not in groups:
            groups[others] = {}
            order.append(others)
        groups[others].setdefault(budget, (written, job))
    values: dict[str, set] = {}  # each override's values over the jobs: a group is named by those that vary
    for job in asked:
        for line in job:
            values.setdefault(line.split("=", 1)[0], set()).add(line)
    launched: list[list[str]] = []
    for entry in order:
        if isinstance(entry, list):
            launched.append(entry)
            continue
        group = sorted(groups[entry].items())  # [(budget, (as written, job))], shortest first
        each = [job for _, (_, job) in group]
        if len(group) < 2:
            launched += each
            continue
        in_order = [job for _, job in groups[entry].values()]  # (trained separately: in the sweep's order)
        named = "".join(f"{line} " for line in entry if len(values[line.split("=", 1)[0]]) > 1)  # ("": one setting)
        budgets = [written for _, (written, _) in group]
        reason, settings = _why_not_group(group, compose)
        if reason:
            log.info("sweep: %strains fit.epochs=%s separately: %s", named, ",".join(budgets), reason)
            launched += in_order
            continue
        longest = settings[-1]
        done = [finished(setting, job) for setting, job in zip(settings, each)]  # (as sweep_job will find them)
        missing = [budget for (budget, _), was in zip(group, done) if not was]
        left = [written for (_, (written, _)), was in zip(group, done) if not was]  # (as written: the line's)
        before = [written for (_, (written, _)), was in zip(group, done) if was]
        if not missing:
            log.info("sweep: %sfit.epochs=%s finished before: not trained again", named, ",".join(budgets))
        elif len(missing) == 1:  # (a resume: the others finished before)
            log.info("sweep: %strains to %s epochs for fit.epochs=%s alone; fit.epochs=%s finished before", named,
                     missing[0], left[0], ",".join(before))
        else:
            spared = sum(missing[:-1])
            log.info("sweep: %strains once, to %s epochs, for fit.epochs=%s, each recorded as its own run (%d epoch%s "
                     "not repeated; sweep.share_budgets=false: each alone)%s", named, missing[-1], ",".join(left),
                     spared, "s" * (spared != 1), f"; fit.epochs={','.join(before)} finished before" if before else "")
        launched.append([*each[-1], f"+hydra.job.env_set.{BUDGETS}='{','.join(budgets)}'"])
        if reference is not None and missing and missing[-1] == group[-1][0] and records(longest, reference):
            log.info("sweep: %salso records the early-stopping reference job from its training (at most %d epochs)",
                     named, reference.fit.epochs)
            launched[-1].append(f"+hydra.job.env_set.{REFERENCE}={reference.fit.epochs}")
            reference = None
    return launched


def records(longest: PipelineConfig, reference: PipelineConfig) -> bool:
    """Whether a training of `longest` can record the early-stopping reference job too: the same settings but for
    early stopping, fit.epochs (at most the training's) and the run's name."""
    apart = ("fit.epochs", "fit.early_stopping.enabled", "tracking.run_name")
    ours, its = ({k: str(v) for k, v in config.flatten(s).items() if k not in apart} for s in (longest, reference))
    return ours == its and reference.fit.epochs <= longest.fit.epochs and reference.fit.early_stopping.enabled


def _why_not_group(group, compose) -> tuple[Optional[str], list[PipelineConfig]]:
    """Why the group's jobs cannot share one training (None: they can), and each job's settings."""
    try:
        settings = [compose(list(job)) for _, (_, job) in group]
    except Exception as error:  # each job then fails (or is refused) on its own, as without sharing
        return f"its settings do not compose ({str(error).splitlines()[0] if str(error) else type(error).__name__})", []
    reason = why_not(settings[-1])
    if reason:
        return reason, settings
    flat = [config.flatten(s) for s in settings]
    for key in flat[-1]:
        if key not in SAME and any(str(f.get(key)) != str(flat[-1][key]) for f in flat):
            values = ", ".join(f"{f.get(key)} at {budget}" for (budget, _), f in zip(group, flat))
            return f"{key} differs between the budgets ({values}): it reads fit.epochs", settings
    return None, settings


def composer(load: Callable[[list[str]], DictConfig]) -> Callable[[list[str]], PipelineConfig]:
    """plan()'s `compose`: a job's settings from `load(overrides)` (Hydra composing it, a fifth of a second a job);
    but a job that differs from one loaded before only in the values of plain keys (`build.hidden_units=32`, not a
    config group, a `+` or `~`, or a dict or list): that one's config with those values set in order, as Hydra sets
    them after composing (OmegaConf.update), and what interpolates them resolved anew."""
    bases: dict[tuple, DictConfig] = {}  # a composed config, by its jobs' overrides but the plain values

    def compose(overrides: list[str]) -> PipelineConfig:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        plain = [o for o in parsed if _plain(o)]
        shape = (tuple(o.input_line for o in parsed if not _plain(o)), tuple(o.key_or_group for o in plain))
        if shape in bases:
            composed = copy.deepcopy(bases[shape])
            for override in plain:
                OmegaConf.update(composed, override.key_or_group, override.value(), merge=True)
        else:
            composed = bases.setdefault(shape, load(overrides))
        return config.load(composed)

    return compose


def _plain(override) -> bool:
    """A value set on a key of the config (not a config group, a package, an addition or deletion, or a dict or list),
    whose setting after composition is all it changes."""
    key = override.key_or_group
    return not (override.is_add() or override.is_force_add() or override.is_delete() or override.is_sweep_override()) \
        and override.package is None and "." in key and "/" not in key and not key.startswith("hydra.") \
        and not isinstance(override.value(), (dict, list))


class BudgetSweeper(Sweeper):
    """Hydra's basic sweeper on its public plugin interface: the grid of every combination of the swept values, in
    the order the basic sweeper makes it (`hydra.sweeper.params` first, then the command line), `max_batch_size`
    jobs a batch; but each group of jobs that differ only in fit.epochs launched as one job (plan)."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None) -> None:
        super().__init__()
        self.max_batch_size, self.params = max_batch_size, params or {}

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        choices: dict[str, list[str]] = {}  # (a key given twice: the later value, in the first one's place)
        for override in parser.parse_overrides([f"{key}={value}" for key, value in self.params.items()] + arguments):
            key = override.get_key_element()
            if override.is_sweep_override() and not override.is_discrete_sweep():
                raise ValueError(f"{key}: a sweep over a range of reals needs a search (hydra/sweeper=optuna)")
            choices[key] = ([f"{key}={value}" for value in override.sweep_string_iterator()]
                            if override.is_sweep_override() else [f"{key}={override.get_value_element_as_str()}"])
        composed: set[tuple] = set()  # the jobs plan() composed: they need not be composed again to check them
        load = composer(lambda overrides: self.hydra_context.config_loader.load_sweep_config(self.config, overrides))

        def compose(overrides: list[str]) -> PipelineConfig:
            settings = load(overrides)
            composed.add(tuple(overrides))
            return settings

        jobs = plan([list(job) for job in itertools.product(*choices.values())], compose, self._reference(), finished)
        told = tuple(f"+hydra.job.env_set.{name}=" for name in (BUDGETS, REFERENCE))  # (what plan() tells a job)
        self.validate_batch_is_legal([job for job in jobs if tuple(
            line for line in job if not line.startswith(told)) not in composed])  # (each job composes, before any runs)
        folder = Path(self.config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, folder / "multirun.yaml")  # (as Hydra's sweepers keep the sweep's config)
        size, returns = max(self.max_batch_size or 0, 0) or max(len(jobs), 1), []  # (None or -1: all at once)
        from pipeline.tracking.later import LATER  # (the tracking package: imported once the sweep runs)

        with LATER.opened():  # a job run here may leave its last record to finish beside the next: finished here
            for first in range(0, len(jobs), size):
                results = self.launcher.launch(jobs[first:first + size], initial_job_idx=first)
                for result in results:
                    _ = result.return_value  # (raises a job's error, as Hydra's basic sweeper does)
                returns.append(results)
        return returns

    def _reference(self) -> Optional[PipelineConfig]:
        """The sweep's early-stopping reference job's settings, when it asks for one (SweepCallback runs it)."""
        try:
            settings = config.load(self.config)
        except Exception:  # (the sweep's callback has said why already)
            return None
        if not settings.sweep.early_stopping_reference:
            return None
        reference = reference_of(settings)
        named = replace(reference, tracking=replace(reference.tracking, run_name=sweep.reference_name(
            reference, json.loads(os.environ.get(sweep.AXES, "[]")))))
        return None if finished(named, []) else reference  # (a resume that finds it finished records it again nowhere)


def finished(settings: PipelineConfig, job: list[str]) -> bool:
    """Whether a resume finds the job of these settings (composed from the overrides `job`) finished, as sweep_job will
    (sweep.finished_job; one that cannot be asked about: not)."""
    if not os.environ.get(sweep.RESUMING):
        return False
    try:
        return sweep.finished_job(sweep.child_settings(settings, job, 0), quiet=True) is not None
    except Exception:  # (the job says why it fails)
        return False


def reference_of(settings: PipelineConfig) -> PipelineConfig:
    """The early-stopping reference job's settings (but for its run's name): `settings` with early stopping on."""
    return replace(settings, fit=replace(settings.fit, early_stopping=replace(settings.fit.early_stopping,
                                                                              enabled=True)))


def asked() -> list[str]:
    """The budgets this job records from one training (as written), shortest first; [] when it is a job of its own."""
    return [value for value in os.environ.get(BUDGETS, "").split(",") if value]


def sweep_job(cfg, overrides: list[str], number: int, ready: Callable[[PipelineConfig], PipelineConfig]) -> float:
    """A sweep job: one run of its settings or, when asked() names budgets, one training to its longest budget that
    records each budget as its own child run. A job (a budget) a resume finds finished is not run again; settings
    that do not load, or data this worker cannot read, make a FAILED child for each, saying why, at once; a failed
    training fails its runs and the sweep goes on. Its return: the longest budget's best validation accuracy (NaN
    when it failed)."""
    from pipeline import tracking
    from pipeline.train import train
    from pipeline.tracking import sweeps

    named = {budget: with_budget(overrides, budget) for budget in asked()} or {None: list(overrides)}
    try:
        loaded = config.load(cfg)
        every = [sweep.child_settings(loaded if budget is None else replace(loaded, fit=replace(loaded.fit, epochs=int(
            budget))), job, number) for budget, job in named.items()]
        ready(every[-1])
    except (ValueError, FileNotFoundError) as error:
        for job in named.values():
            name = sweep.child_name(job, number)
            log.error("sweep job %s (%s): %s", number, name, error)
            sweeps.record_failed_job(name, error)
        return float("nan")
    missing, previous = [], None
    for settings in every:
        previous = sweep.finished_job(settings)
        if previous is None:
            missing.append(settings)
        else:  # resuming a sweep: this job already finished under the parent
            log.info("sweep job %s (%s) already finished as run %s; not run again", number,
                     settings.tracking.run_name, previous["run_id"])
    if not missing:
        return previous["val_accuracy"]
    reference = _reference(every[-1]) if missing[-1] is every[-1] else None
    try:
        metrics, _ = train(missing[-1], budgets=missing[:-1], reference=reference)
    except tracking.RecordKept as kept:  # finished, but its record waits on disk for the server (its command)
        log.error("sweep job %s (%s): %s", number, missing[-1].tracking.run_name, kept)
        return float("nan")
    except Exception:  # one failed job must not stop the sweep: its runs are FAILED with the error
        log.exception("sweep job %s (%s) failed", number, missing[-1].tracking.run_name)
        return float("nan")
    return metrics.get("val_accuracy", float("nan")) if missing[-1] is every[-1] else previous["val_accuracy"]


def _reference(longest: PipelineConfig) -> Optional[PipelineConfig]:
    """The early-stopping reference job this shared training records too (REFERENCE set; None: it does not, or a
    resume finds it finished), with the name SweepCallback gives it."""
    epochs = os.environ.get(REFERENCE)
    if not epochs or int(epochs) > longest.fit.epochs:
        return None
    settings = reference_of(replace(longest, fit=replace(longest.fit, epochs=int(epochs))))
    settings = replace(settings, tracking=replace(settings.tracking, run_name=sweep.reference_name(
        settings, json.loads(os.environ.get(sweep.AXES, "[]")))))
    return settings if sweep.finished_job(settings) is None else None
