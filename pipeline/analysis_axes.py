"""The sweep's axes in numbers: Sweep (the jobs table and how its jobs group along each swept key) and what
the report and figures read from it: per axis, over seeds, per family (the ranking), the best setting.

Pure (no MLflow, no plotting): pipeline.analysis builds the table, analysis_report and analysis_figures read this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

BUDGET, SEED = "fit.epochs", "seed"
FAMILY_AXES = ("build", "build.family")  # a sweep over either ranks its values: a model comparison
OUTCOMES = ["status", "pruned", BUDGET, "epochs_trained", "min_val_loss_epoch", "min_val_loss", "best_val_accuracy",
            "final_accuracy_gap", "test_accuracy", "epoch_seconds", "fit_seconds", "parameters", "model_size_mb"]
RANKING_COLUMNS = ["family", "runs", "test_accuracy_mean", "test_accuracy_std", "best_val_accuracy",
                   "min_val_loss_epoch", "epochs", "own_epochs", "fit_seconds", "parameters", "model_size_mb"]
# Each run's two checkpoints (docs/checkpoints.md) and the test accuracy of each, where the runs logged them
BEST, LAST = "best_epoch_test_accuracy", "last_epoch_test_accuracy"
# A numeric axis with more distinct values than this, or one searched as interval(...), is continuous: the
# report groups its jobs in thirds of the values (by rank) and gives the rank correlation with the value.
MANY_VALUES = 6


@dataclass
class Sweep:
    """What the report and figures read: the table and how its jobs group along each axis."""
    table: pd.DataFrame
    axes: list[str]  # varied axes, seed included
    written: dict[str, str]  # each axis's values as written
    histories: dict[str, pd.DataFrame]
    labels: dict[str, pd.Series]  # axis -> each job's value, or its third of a continuous axis's values
    done: pd.DataFrame  # the jobs that trained their whole budget (not pruned)
    curves: pd.DataFrame  # of those, per setting of the other axes (seed included), the longest budget's job
    family: str | None  # the axis whose values are ranked as families

    @property
    def settings(self) -> list[str]:
        """The axes that are settings: seeds are repeats, not settings."""
        return [axis for axis in self.axes if axis != SEED]


def survey(table: pd.DataFrame, axes: dict[str, str], histories: dict[str, pd.DataFrame]) -> Sweep:
    varied = [axis for axis in axes if table[axis].nunique() > 1]
    done = table[~table["pruned"]]
    if done.empty:  # every job pruned: their partial curves are all there is
        done = table
    curves = done
    if BUDGET in varied:  # a shorter budget's curve is the start of the longer one's: one per setting of the others
        others, by_budget = [axis for axis in varied if axis != BUDGET], done.sort_values(BUDGET, kind="stable")
        curves = by_budget.groupby(others, dropna=False).tail(1) if others else by_budget.tail(1)
    family = next((axis for axis in FAMILY_AXES if axis in varied), None)
    labels = {axis: grouping(done[axis], axes[axis]) for axis in varied}  # thirds of the whole-budget jobs
    return Sweep(table, varied, dict(axes), histories, labels, done, curves.sort_index(), family)


def continuous(values: pd.Series, written: str = "") -> bool:
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return numeric and ("interval(" in written or values.nunique() > MANY_VALUES)


def grouping(values: pd.Series, written: str = "") -> pd.Series:
    """Each job's group along an axis: its value or, on a continuous axis with more than three values, its
    third of the values by rank, labelled by the range it spans (an ordered categorical)."""
    if not continuous(values, written) or values.nunique() <= 3:
        return values
    thirds = pd.qcut(values.rank(method="first"), 3, labels=False)
    spans = [(values[thirds == i].min(), values[thirds == i].max()) for i in range(3)]
    names = [show(low) if low == high else f"{show(low)}-{show(high)}" for low, high in spans]
    return pd.Series(pd.Categorical.from_codes(thirds.astype(int), names, ordered=True), index=values.index)


def show(value) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def by_axis(sweep: Sweep, axis: str) -> pd.DataFrame:
    """How the outcome moves along `axis`: per value (or third), the jobs, their mean best validation accuracy,
    the median epoch of lowest validation loss (on each setting's longest curve; along the budget itself, on
    every job) and the mean test accuracy of each model the runs measured (tested())."""
    done, label = sweep.done, sweep.labels[axis]
    epochs = done if axis == BUDGET else sweep.curves
    groups = done.groupby(label[done.index], observed=True)
    return pd.DataFrame({
        "jobs": groups.size(), "best_val_accuracy": groups["best_val_accuracy"].mean(),
        "min_val_loss_epoch": epochs.groupby(label[epochs.index], observed=True)["min_val_loss_epoch"].median(),
        **{column: groups[column].mean() for column, _ in tested(sweep)}}).rename_axis(axis).reset_index()


def tested(sweep: Sweep) -> list[tuple[str, str]]:
    """(column, the model it measures) for each model whose test accuracy every whole-budget job has: the best
    epoch's and the last epoch's where the runs logged both checkpoints, else the served one's."""
    if {BEST, LAST} <= set(sweep.done.columns) and sweep.done[[BEST, LAST]].notna().all().all():
        served = set(sweep.done.get("served", pd.Series(dtype=object)).dropna())
        best = "the best epoch's model" + (" (the one served)" if served == {"best"} else "")
        return [(BEST, best), (LAST, "the last epoch's model" + (" (the one served)" if served == {"last"} else ""))]
    return [("test_accuracy", served_model(sweep))]


def served_model(sweep: Sweep) -> str:
    """What a job's `test_accuracy` measures: the model its run serves (evaluate.serve: best, the default, or last)."""
    served = set(sweep.table.get("served", pd.Series(dtype=object)).dropna())
    if not served and BEST not in sweep.table:
        return "the last epoch's model"  # (runs from before checkpoints: they served their last epoch)
    which = {"best": "best-epoch", "last": "last-epoch"}.get(served.pop()) if len(served) == 1 else None
    return f"the served ({which}) model" if which else "the served model"


def model_key(sweep: Sweep, column: str = "test_accuracy") -> str:
    """The model a test-accuracy column measures, as parent metric names say it."""
    named = {BEST: "best_epoch_model", LAST: "last_epoch_model"}.get(column)
    return named or ("last_epoch_model" if served_model(sweep) == "the last epoch's model" else "served_model")


def seed_spread(sweep: Sweep, outcome: str, frame: pd.DataFrame | None = None) -> float:
    """How much `outcome` moves between seeds alone: the standard deviation over the seeds of a setting, the
    mean over the settings run with more than one seed. NaN without seeds."""
    frame = sweep.done if frame is None else frame
    if SEED not in sweep.axes or outcome not in frame:
        return float("nan")
    groups = frame.assign(setting="every job").groupby(sweep.settings or ["setting"], dropna=False)[outcome]
    spread = groups.std(ddof=0)[groups.size() > 1]
    return float(spread.mean()) if len(spread) else float("nan")


def contrast(sweep: Sweep, frame: pd.DataFrame, axis: str, low, high, difference: float, spread: float) -> list[str]:
    """What a difference between the jobs of `frame` at `low` and at `high` on `axis` rests on, as caveats
    (none: a finding): one job on a side, other axes not held fixed between the two sides (confounded),
    a difference no larger than the spread between seeds."""
    label = sweep.labels[axis][frame.index] if axis in sweep.labels else frame[axis]
    sides = [frame[label == value] for value in (low, high)]
    caveats = []
    if min(len(side) for side in sides) == 1:
        caveats.append("one job per side" if max(len(side) for side in sides) == 1 else "one job on a side")
    confounded = [other for other in sweep.axes if other not in (axis, SEED) and  # its values not the same on both sides
                  len({tuple(sorted(map(str, sweep.labels[other][side.index]))) for side in sides}) > 1]
    if confounded:
        caveats.append("confounded: " + ", ".join(f"`{other}`" for other in confounded) + " also differ"
                       + ("s" if len(confounded) == 1 else "") + " between the two sides")
    if spread == spread and abs(difference) <= spread:
        caveats.append("within the spread between seeds")
    return caveats


def sides(frame: pd.DataFrame, label: pd.Series, low, high) -> str:
    """How many jobs stand at `low` and at `high`: "2 jobs vs 1"."""
    counts = [int((label[frame.index] == value).sum()) for value in (low, high)]
    return f"{counts[0]} {'job' if counts[0] == 1 else 'jobs'} vs {counts[1]}"


def rank_correlation(sweep: Sweep, axis: str, outcome: str) -> float:
    """Spearman's rho between a continuous axis's values and an outcome, over the whole-budget jobs."""
    frame = sweep.done if outcome != "min_val_loss_epoch" or axis == BUDGET else sweep.curves
    return float(frame[axis].rank().corr(frame[outcome].rank())) if len(frame) > 2 else float("nan")


def over_seeds(sweep: Sweep) -> pd.DataFrame:
    """With seed as an axis: one row per setting of the other axes, mean and spread (standard deviation over
    seeds) of best validation and test accuracy, the median lowest-loss epoch; best first."""
    keys = sweep.settings or ["setting"]
    groups = sweep.done.assign(setting="every job").groupby(keys, dropna=False)
    frame = pd.DataFrame({
        "seeds": groups.size(), "best_val_accuracy_mean": groups["best_val_accuracy"].mean(),
        "best_val_accuracy_std": spread(groups["best_val_accuracy"]),
        "test_accuracy_mean": groups["test_accuracy"].mean(), "test_accuracy_std": spread(groups["test_accuracy"]),
        "min_val_loss_epoch": groups["min_val_loss_epoch"].median()}).reset_index()
    return frame.sort_values("best_val_accuracy_mean", ascending=False, ignore_index=True, kind="stable")


def spread(values) -> pd.Series:
    """The standard deviation over each group's runs; none (NaN) for a group of one run: one run has no spread."""
    return values.std(ddof=0).where(values.size() > 1)


def best_setting(sweep: Sweep) -> tuple[pd.Series | None, pd.Series]:
    """(the setting of the highest mean validation accuracy over seeds, or None without seeds; its job of the
    highest validation accuracy). Chosen by validation accuracy: the test split chooses nothing."""
    if SEED not in sweep.axes or not sweep.settings:
        return None, sweep.done.loc[sweep.done["best_val_accuracy"].idxmax()]
    setting = over_seeds(sweep).iloc[0]
    runs = sweep.done
    for axis in sweep.settings:
        runs = runs[(runs[axis] == setting[axis]) | (runs[axis].isna() & pd.isna(setting[axis]))]
    return setting, runs.loc[runs["best_val_accuracy"].idxmax()]


def rank(sweep: Sweep) -> pd.DataFrame:
    """One row per family (the value of the build axis): mean and spread (standard deviation over its runs) of
    test accuracy, mean best validation accuracy, median epoch of the lowest validation loss, the longest
    budget and the family's own (its conf/build file's, where known), mean training seconds, size; by mean best
    validation accuracy."""
    groups = sweep.done.groupby(sweep.family)
    ranking = pd.DataFrame({
        "runs": groups.size(), "test_accuracy_mean": groups["test_accuracy"].mean(),
        "test_accuracy_std": spread(groups["test_accuracy"]), "best_val_accuracy": groups["best_val_accuracy"].mean(),
        "min_val_loss_epoch": groups["min_val_loss_epoch"].median(), "epochs": groups[BUDGET].max(),
        "own_epochs": groups["family_epochs"].max() if "family_epochs" in sweep.done else np.nan,
        "fit_seconds": groups["fit_seconds"].mean(), "parameters": groups["parameters"].max(),
        "model_size_mb": groups["model_size_mb"].max()}).rename_axis("family").reset_index()
    return ranking.sort_values(["best_val_accuracy", "family"], ascending=[False, True], ignore_index=True)[RANKING_COLUMNS]


def rise(sweep: Sweep, run_id: str) -> float:
    """How far validation loss climbs from its minimum to the last epoch trained."""
    val_loss = sweep.histories[run_id]["val_loss"]
    return float(val_loss.iloc[-1] - val_loss.min())
