"""The sweep analysis in words: report(sweep, ...) -> (headline metrics, Markdown report).

It speaks of the axes that varied and nothing else: the overfitting finding (or, for a sweep over `build`,
the family ranking and each family's overfitting: analysis_families), the best job, how the outcome moves along
each axis, seeds as mean and spread, pruned jobs, then the jobs table. Every cost or gain names the model it
measures (each run's best or last epoch's) and the jobs on each side; a difference resting on one job per side,
on axes that also differ, or within the spread between seeds is said not to be a finding. Pure: no MLflow, no
plotting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.analysis_axes import BEST, BUDGET, LAST, SEED, Sweep, best_setting, by_axis, continuous, contrast, \
    model_key, over_seeds, rank_correlation, rise, seed_spread, served_model, show, sides, tested
from pipeline.analysis_families import comparison
from pipeline.analysis_text import caveat, markdown, shared_trainings, spread_of

LISTED = 12  # per-setting lists longer than this are left to the tables


def report(sweep: Sweep, failed: pd.DataFrame, ranking: pd.DataFrame | None, best_run: str,
           early_stopping: dict | None) -> tuple[dict, str]:
    """(headline metrics, Markdown). `ranking`: a sweep over build's (else None); `best_run`: the chosen job's run;
    `early_stopping`: the reference job (job, stopped_epoch, best_epoch, test_accuracy) or None."""
    headline = {"jobs_finished": float(len(sweep.table)), "jobs_failed": float(len(failed))}
    best = sweep.table.set_index("run_id").loc[best_run]
    numbers, champion = chosen(sweep, best, best_run)
    found, findings = comparison(sweep, ranking, champion) if sweep.family else overfitting(sweep)
    headline.update(numbers, **found)
    lines = [title(sweep), "", intro(sweep, failed, ranking), "", *findings, *([] if sweep.family else champion)]
    for numbers, text in (reference(sweep, best, early_stopping), axes_section(sweep), seeds_section(sweep), pruning(sweep),
                          shared_trainings(sweep.table)):
        headline.update(numbers)
        lines += text
    jobs = sweep.table.drop(columns=["run_id", "training"], errors="ignore")  # (jobs.csv keeps both)
    lines += ["", "## Jobs", "", markdown(jobs, tuple(sweep.axes)), failed_section(failed)]
    return headline, "\n".join(lines) + "\n"


def title(sweep: Sweep) -> str:
    if sweep.family:
        return "# Model comparison: which family, at what cost?"
    return "# Sweep analysis: " + (" x ".join(f"`{axis}`" for axis in sweep.axes) or "one setting")


def intro(sweep: Sweep, failed: pd.DataFrame, ranking: pd.DataFrame | None) -> str:
    table = sweep.table
    pruned = int(table["pruned"].sum())
    text = (f"{len(table)} jobs finished" + (f" ({pruned} of them pruned)" if pruned else "")
            + (f", {len(failed)} failed" if len(failed) else ""))
    if sweep.family:
        text += f", {len(ranking)} families, chosen by mean best validation accuracy (the test split chooses nothing)."
    else:
        swept = "; ".join(f"`{axis}` ({sweep.written.get(axis, '')})" for axis in sweep.axes)
        text += (f". Swept: {swept}." if swept else ".") + (
            " Seeds repeat each setting: their numbers are the mean and spread over seeds." if SEED in sweep.axes else "")
    models = " and ".join(name for _, name in tested(sweep))
    text += f" Test accuracy is measured on {models}; each statement names the one it means."
    if SEED not in sweep.axes:
        text += " One seed: no difference here is measured against the spread between seeds."
    return text


def setting_name(row, axes: list[str]) -> str:
    return ",".join(f"{axis}={show(row[axis])}" for axis in axes)


def overfitting(sweep: Sweep) -> tuple[dict, list[str]]:
    """Where validation loss is lowest, what training past it costs, and how that moves along numeric axes."""
    curves, settings = sweep.curves, [axis for axis in sweep.settings if axis != BUDGET]
    median_epoch = float(np.median(curves["min_val_loss_epoch"]))
    longest = ", each setting at its longest budget" if BUDGET in sweep.axes else ""
    per = ""
    if settings:
        by_setting = curves.groupby(settings, dropna=False)["min_val_loss_epoch"].median().reset_index()
        if len(by_setting) <= LISTED:
            per = (f"; per setting{' (median over seeds)' if SEED in sweep.axes else ''}: " + "; ".join(
                f"{setting_name(row, settings)} -> epoch {row['min_val_loss_epoch']:g}" for _, row in by_setting.iterrows()))
    overfit = curves[curves["min_val_loss_epoch"] < curves["epochs_trained"]]
    line = (f"- **Validation loss is lowest at epoch {median_epoch:g}** (median over {len(curves)} "
            f"{'job' if len(curves) == 1 else 'jobs'}{longest}){per}.")
    if overfit.empty:
        line += " It is still falling at the last epoch of every job: no overfitting within these budgets."
    lines = [line]
    costs, found = longest_budget(sweep)
    lines += costs
    if not costs and not overfit.empty:  # (a search rarely trains one setting at two budgets)
        rises = [rise(sweep, run_id) for run_id in overfit["run_id"]]
        lines.append(f"- In {len(overfit)} of {len(curves)} jobs validation loss then rises, by {np.median(rises):.3f} "
                     f"(median) to the last epoch ({budgets(overfit)}): they overfit after epoch "
                     f"{float(overfit['min_val_loss_epoch'].median()):g}.")
    measured, past = past_the_best(sweep)
    lines += measured
    for axis in settings:
        if continuous(sweep.table[axis]) or pd.api.types.is_numeric_dtype(sweep.table[axis]):
            lines += trend(sweep, axis)
    return {"median_min_val_loss_epoch": median_epoch, **found, **past}, lines


def longest_budget(sweep: Sweep) -> tuple[list[str], dict]:
    """With the budget swept: the longest budget against the one where the last epoch's model scores best (the
    budget training stops at decides that model; the best epoch's is kept whatever the budget), for each model
    the runs measured, as the mean test accuracy of each budget's jobs (the `fit.epochs` table's numbers)."""
    if BUDGET not in sweep.axes:
        return [], {}
    done, models = sweep.done, tested(sweep)
    means = done.groupby(BUDGET)[[column for column, _ in models]].mean()
    chooser = LAST if LAST in means else models[0][0]
    name = dict(models)[chooser]
    longest, best = means.index.max(), means[chooser].idxmax()
    metrics = {f"longest_vs_best_budget_points.{model_key(sweep, column)}":
               100 * float(means.loc[longest, column] - means.loc[best, column]) for column, _ in models}
    count = sides(done, sweep.labels[BUDGET], best, longest)
    if best == longest:
        return [f"- **{name[0].upper() + name[1:]} scores best at the longest budget, {show(longest)} epochs** (mean "
                f"test accuracy {means.loc[longest, chooser]:.4f}, {count.split(' vs ')[0]}): training longer costs it "
                "nothing within these budgets."], metrics
    said = []
    for column, model in sorted(models, key=lambda item: item[0] != chooser):
        points = 100 * (means.loc[longest, column] - means.loc[best, column])
        verb = f"leaves {model} as it was" if round(points, 2) == 0 else \
            f"{'gains' if points > 0 else 'costs'} {model} {abs(points):.2f} points of test accuracy"
        said.append(f"{verb}** "
                    f"({means.loc[longest, column]:.4f} against {means.loc[best, column]:.4f})")
    line = (f"- **Training to {show(longest)} epochs instead of {show(best)} " + " and **".join(said)
            + f": the mean over the jobs of each budget ({count}); {show(best)} epochs is where {name} scores best.")
    others = [axis for axis in sweep.axes if axis != BUDGET]
    pairs = [group for _, group in done.groupby(others, dropna=False)] if others else []
    pairs = [group.set_index(BUDGET)[chooser] for group in pairs if {best, longest} <= set(group[BUDGET])]
    if others and pairs:
        lower = sum(pair.loc[longest].mean() < pair.loc[best].mean() for pair in pairs)
        line += (f" Setting by setting ({', '.join(others)}), {name} scores lower at {show(longest)} in {lower} of "
                 f"{len(pairs)}.")
    difference = means.loc[longest, chooser] - means.loc[best, chooser]
    return [line + caveat(contrast(sweep, done, BUDGET, best, longest, difference, seed_spread(sweep, chooser)))], metrics


def past_the_best(sweep: Sweep) -> tuple[list[str], dict]:
    """What training past the best epoch cost, measured on every run: its best epoch's model against its last's."""
    columns = ["best_epoch", "last_epoch", BEST, LAST]
    if not set(columns) <= set(sweep.done.columns):
        return [], {}
    both = sweep.done.dropna(subset=columns)
    both = both[both["best_epoch"] != both["last_epoch"]]  # (early stopping's restored weights: one model)
    if both.empty:
        return [], {}
    points = 100 * (both[BEST] - both[LAST])
    jobs = f"{len(both)} {'job' if len(both) == 1 else 'jobs'}"
    return ([f"- **Measured on every run: stopping at the best epoch instead of the last gains {points.median():+.2f} "
            f"points of test accuracy** (median over {jobs}, each run's best-epoch model against its last-epoch "
            f"model; from {points.min():+.2f} to {points.max():+.2f})." + caveat(["one job"] if len(both) == 1 else [])],
            {"median_best_vs_last_epoch_points": float(points.median())})


def budgets(jobs: pd.DataFrame) -> str:
    low, high = int(jobs["epochs_trained"].min()), int(jobs["epochs_trained"].max())
    return f"epoch {high}" if low == high else f"epochs {low}-{high}"


def trend(sweep: Sweep, axis: str) -> list[str]:
    """The smallest and the largest value (or third) of a numeric axis: when each overfits, and its final gap,
    with the jobs on each side; a trend only where neither side is one job, nothing else differs between the
    sides and the difference exceeds the spread between seeds."""
    curves = sweep.curves
    groups = curves.groupby(sweep.labels[axis][curves.index], observed=True)
    epoch, gap = groups["min_val_loss_epoch"].median(), groups["final_accuracy_gap"].median()
    if len(epoch) < 2:
        return []
    low, high = epoch.index[0], epoch.index[-1]
    gaps = f"the final train-validation accuracy gap is {100 * gap[high]:.1f} vs {100 * gap[low]:.1f} points."
    said = (f"{axis}={show(high)} reaches its lowest validation loss at epoch {epoch[high]:g}, {axis}={show(low)} at "
            f"epoch {epoch[low]:g} (the median of {sides(curves, sweep.labels[axis], high, low)}, each setting's "
            f"longest curve); {gaps}")
    if epoch[high] == epoch[low]:
        return [f"- `{axis}` does not move the epoch of lowest validation loss: {said}"]
    caveats = contrast(sweep, curves, axis, low, high, epoch[high] - epoch[low],
                       seed_spread(sweep, "min_val_loss_epoch", curves))
    if len(epoch) > 2 and "one job" in " ".join(caveats):  # every job along the axis, as evidence
        rho = rank_correlation(sweep, axis, "min_val_loss_epoch")
        caveats[0] += f" (over all {len(curves)} curves, the epoch's rank correlation with `{axis}` is {rho:+.2f})"
    if caveats:
        return [f"- `{axis}` and the epoch of lowest validation loss: {said}{caveat(caveats)}"]
    way = "sooner" if epoch[high] < epoch[low] else "later"
    return [f"- Larger `{axis}` overfits {way}: {said}"]


def chosen(sweep: Sweep, best: pd.Series, best_run: str) -> tuple[dict, list[str]]:
    served = served_model(sweep)
    numbers = {f"best_job.{model_key(sweep)}.test_accuracy": float(best["test_accuracy"]),
               "best_job.best_val_accuracy": float(best["best_val_accuracy"])}
    job = (f"`{best['job']}` (run `{best_run}`), best validation accuracy {best['best_val_accuracy']:.4f}, "
           f"test accuracy of {served} {best['test_accuracy']:.4f}.")
    if sweep.family:
        return numbers, [f"- **Champion** (the best family's job of the highest validation accuracy): {job}"]
    setting, _ = best_setting(sweep)
    if setting is None:
        return numbers, [f"- **Best job** (highest validation accuracy): {job}"]
    return numbers, [
        f"- **Best setting** (highest mean validation accuracy over {int(setting['seeds'])} seeds): "
        f"{setting_name(setting, sweep.settings)}, validation accuracy {setting['best_val_accuracy_mean']:.4f}"
        f"{spread_of(setting['best_val_accuracy_std'], setting['seeds'], 'seeds')}, test accuracy of {served} "
        f"{setting['test_accuracy_mean']:.4f}{spread_of(setting['test_accuracy_std'], setting['seeds'], 'seeds')}. "
        f"**Best job**, its seed of the highest validation accuracy: {job}"]


def reference(sweep: Sweep, best: pd.Series, early: dict | None) -> tuple[dict, list[str]]:
    if not early:
        return {}, []
    delta = 100 * (early["test_accuracy"] - best["test_accuracy"])
    return ({"early_stopping.test_accuracy": float(early["test_accuracy"]),
             "early_stopping.stopped_epoch": float(early["stopped_epoch"])},
            [f"- **Early stopping** (`{early['job']}`) stopped at epoch {early['stopped_epoch']} and kept epoch "
             f"{early['best_epoch']}'s weights: test accuracy {early['test_accuracy']:.4f} (that epoch's model), "
             f"{delta:+.2f} points against {served_model(sweep)} of the sweep's best job, with no epoch budget to "
             "choose." + caveat(["one job per side"])])


def axes_section(sweep: Sweep) -> tuple[dict, list[str]]:
    """Per axis: where best validation accuracy is highest and lowest (the jobs on each side, and what the
    difference rests on), when validation loss bottoms out."""
    lines = []
    for axis in sweep.settings:
        if axis == sweep.family:
            continue  # the ranking is this axis's table
        table = by_axis(sweep, axis)
        accuracy, epoch = table.set_index(axis)["best_val_accuracy"], table.set_index(axis)["min_val_loss_epoch"].dropna()
        if accuracy.nunique() > 1:
            text = "Best validation accuracy is highest at " + extremes(
                sweep, axis, sweep.done, accuracy, "best_val_accuracy", "as the mean over each value's jobs")
        else:
            text = f"Best validation accuracy is {accuracy.iloc[0]:.4f} at every value (the mean over its jobs)."
        if len(epoch) and epoch.nunique() > 1:  # (on each setting's longest curve; along the budget, every job's)
            frame = sweep.done if axis == BUDGET else sweep.curves
            text += " Validation loss is lowest latest at " + extremes(sweep, axis, frame, epoch, "min_val_loss_epoch",
                                                                       "as the median")
        elif len(epoch):
            text += f" Validation loss is lowest at epoch {epoch.iloc[0]:g} at every value."
        if isinstance(sweep.labels[axis].dtype, pd.CategoricalDtype):
            text += " Its values are grouped in thirds, by rank."
        rho = [rank_correlation(sweep, axis, outcome) for outcome in ("best_val_accuracy", "min_val_loss_epoch")]
        if continuous(sweep.table[axis], sweep.written.get(axis, "")) and not np.isnan(rho).all():  # (NaN: too few jobs)
            said = [f"{value:+.2f}" if value == value else "none (it does not vary)" for value in rho]
            text += (f" Rank correlation (Spearman) with the value: best validation accuracy {said[0]}, epoch of "
                     f"the lowest validation loss {said[1]}.")
        if axis == BUDGET and len(tested(sweep)) > 1:
            text += (" Test accuracy of both models of each run: the best epoch's (kept whatever the budget) and "
                     "the last epoch's (the budget decides it).")
        lines += ["", f"### `{axis}` ({sweep.written.get(axis, '')})", "", text, "", markdown(table, (axis,))]
    return {}, (["", "## Along each axis"] + lines) if lines else []


def extremes(sweep: Sweep, axis: str, frame: pd.DataFrame, values: pd.Series, outcome: str, how: str) -> str:
    """"A (0.8500, 2 jobs) and lowest at B (0.8400, 2 jobs), as the mean." and what the difference rests on."""
    high, low = values.idxmax(), values.idxmin()
    label = sweep.labels[axis][frame.index]
    epoch = outcome.endswith("epoch")
    said = []
    for value in (high, low):
        jobs = int((label == value).sum())
        number = f"epoch {values[value]:g}" if epoch else f"{values[value]:.4f}"
        said.append(f"{show(value)} ({number}, {jobs} {'job' if jobs == 1 else 'jobs'})")
    caveats = contrast(sweep, frame, axis, low, high, values[high] - values[low], seed_spread(sweep, outcome, frame))
    return f"{said[0]} and {'soonest' if epoch else 'lowest'} at {said[1]}, {how}.{caveat(caveats)}"


def seeds_section(sweep: Sweep) -> tuple[dict, list[str]]:
    if SEED not in sweep.axes or sweep.settings == [sweep.family]:
        return {}, []  # a comparison over seeds alone: the ranking has the mean and spread
    seeds = ", ".join(show(seed) for seed in sorted(sweep.done[SEED].unique()))
    return {}, ["", "## Over seeds", "", f"Seeds {seeds} repeat each setting: the mean and spread (standard "
                "deviation over seeds) of each, best first.", "", markdown(over_seeds(sweep), tuple(sweep.axes))]


def pruning(sweep: Sweep) -> tuple[dict, list[str]]:
    """How many jobs a pruner stopped, the epochs they trained of their budget, and the training time saved:
    the epochs they did not train, each at its job's median epoch time."""
    pruned = sweep.table[sweep.table["pruned"]]
    if pruned.empty:
        return {}, []
    saved = float(((pruned[BUDGET] - pruned["epochs_trained"]) * pruned["epoch_seconds"]).sum())
    named = [f"`{row['job']}`" + (f" (trial {int(row['trial'])})" if pd.notna(row.get("trial")) else "")
             + f" {int(row['epochs_trained'])} of {int(row[BUDGET])}" for _, row in pruned.iterrows()]
    return ({"jobs_pruned": float(len(pruned)), "pruning_saved_seconds": saved},
            ["", "## Pruning", "",
             f"- **{len(pruned)} of {len(sweep.table)} jobs were pruned**, epochs trained of their budget: "
             + ", ".join(named[:LISTED]) + (", ..." if len(named) > LISTED else "")
             + f". Pruning saved about {saved:.0f} s of training (the epochs they did not train, each at its job's "
             "median epoch time). They are left out of the findings above: their curves stop early."])


def failed_section(failed: pd.DataFrame) -> str:
    if failed.empty:
        return ""
    return "\n## Failed jobs\n\n" + markdown(failed) + "\n"
