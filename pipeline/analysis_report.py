"""The sweep analysis in words: report(sweep, ...) -> (headline metrics, Markdown report).

It speaks of the axes that varied and nothing else: the overfitting finding (or, for a sweep over `build`,
the family ranking and each family's overfitting), the best job, how the outcome moves along each axis,
seeds as mean and spread, pruned jobs, then the jobs table. Pure: no MLflow, no plotting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.analysis_axes import BUDGET, SEED, Sweep, best_setting, by_axis, continuous, over_seeds, rank_correlation, \
    rise, show

WHOLE = ("epochs_trained", "parameters", "trial", "runs", "seeds")  # counts: shown without decimals
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
    for numbers, text in (reference(best, early_stopping), axes_section(sweep), seeds_section(sweep), pruning(sweep)):
        headline.update(numbers)
        lines += text
    lines += ["", "## Jobs", "", markdown(sweep.table.drop(columns=["run_id"]), tuple(sweep.axes)), failed_section(failed)]
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
        return (text + f", {len(ranking)} families, chosen by mean best validation accuracy (the test split "
                "chooses nothing).")
    swept = "; ".join(f"`{axis}` ({sweep.written.get(axis, '')})" for axis in sweep.axes)
    return text + (f". Swept: {swept}." if swept else ".") + (
        " Seeds repeat each setting: their numbers are the mean and spread over seeds." if SEED in sweep.axes else "")


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
    lines, costs = [line], []
    # a budget's test accuracy is its last epoch's (a run serves its best epoch's: the other checkpoint)
    ended = "last_epoch_test_accuracy" if "last_epoch_test_accuracy" in sweep.done else "test_accuracy"
    if BUDGET in sweep.axes:  # what training to the largest budget costs, per setting: best budget's test accuracy minus the largest's
        others = [axis for axis in sweep.axes if axis != BUDGET]
        for _, group in (sweep.done.groupby(others, dropna=False) if others else [(None, sweep.done)]):
            if group[BUDGET].nunique() > 1:
                at_max = group.loc[group[BUDGET] == group[BUDGET].max(), ended].max()
                costs.append(group[ended].max() - at_max)
        if costs:
            over = f"{len(costs)} settings of {', '.join(others)}" if others else "the one setting"
            lines.append(f"- **Training to {int(sweep.done[BUDGET].max())} epochs instead of the best budget costs "
                         f"{100 * float(np.median(costs)):.2f} points of test accuracy** (median over {over}).")
    if not costs and not overfit.empty:  # (a search rarely trains one setting at two budgets)
        rises = [rise(sweep, run_id) for run_id in overfit["run_id"]]
        lines.append(f"- In {len(overfit)} of {len(curves)} jobs validation loss then rises, by {np.median(rises):.3f} "
                     f"(median) to the last epoch ({budgets(overfit)}): they overfit after epoch "
                     f"{float(overfit['min_val_loss_epoch'].median()):g}.")
    measured, found = past_the_best(sweep)
    lines += measured
    for axis in settings:
        if continuous(sweep.table[axis]) or pd.api.types.is_numeric_dtype(sweep.table[axis]):
            lines += trend(sweep, axis)
    cost = 100 * float(np.median(costs)) if costs else float("nan")
    return {"median_min_val_loss_epoch": median_epoch, "max_epochs_cost_points": cost, **found}, lines


def past_the_best(sweep: Sweep) -> tuple[list[str], dict]:
    """What training past the best epoch cost, measured on every run: its best epoch's model against its last's."""
    columns = ["best_epoch", "last_epoch", "best_epoch_test_accuracy", "last_epoch_test_accuracy"]
    if not set(columns) <= set(sweep.done.columns):
        return [], {}
    both = sweep.done.dropna(subset=columns)
    both = both[both["best_epoch"] != both["last_epoch"]]  # (early stopping's restored weights: one model)
    if both.empty:
        return [], {}
    points = 100 * (both["best_epoch_test_accuracy"] - both["last_epoch_test_accuracy"])
    jobs = f"{len(both)} {'job' if len(both) == 1 else 'jobs'}"
    return [f"- **Measured on every run: stopping at the best epoch instead of the last gains {points.median():+.2f} "
            f"points of test accuracy** (median over {jobs}, each run's best-epoch model against its last-epoch "
            f"model; from {points.min():+.2f} to {points.max():+.2f})."], {"best_vs_last_epoch_points": float(points.median())}


def budgets(jobs: pd.DataFrame) -> str:
    low, high = int(jobs["epochs_trained"].min()), int(jobs["epochs_trained"].max())
    return f"epoch {high}" if low == high else f"epochs {low}-{high}"


def trend(sweep: Sweep, axis: str) -> list[str]:
    """The smallest and the largest value (or third) of a numeric axis: when each overfits, and its final gap."""
    curves = sweep.curves
    groups = curves.groupby(sweep.labels[axis][curves.index], observed=True)
    epoch, gap = groups["min_val_loss_epoch"].median(), groups["final_accuracy_gap"].median()
    if len(epoch) < 2:
        return []
    low, high = epoch.index[0], epoch.index[-1]
    gaps = f"the final train-validation accuracy gap is {100 * gap[high]:.1f} vs {100 * gap[low]:.1f} points."
    if epoch[high] == epoch[low]:
        return [f"- `{axis}` does not move the epoch of lowest validation loss: epoch {epoch[high]:g} at "
                f"{axis}={show(high)} and at {axis}={show(low)}; {gaps}"]
    way = "sooner" if epoch[high] < epoch[low] else "later"
    return [f"- Larger `{axis}` overfits {way}: {axis}={show(high)} reaches its lowest validation loss at epoch "
            f"{epoch[high]:g}, {axis}={show(low)} at epoch {epoch[low]:g}; {gaps}"]


def comparison(sweep: Sweep, ranking: pd.DataFrame, champion: list[str]) -> tuple[dict, list[str]]:
    """The ranking, the chosen family against the tutorial's model, and each family's overfitting."""
    best = ranking.iloc[0]
    repeats = "seeds" if SEED in sweep.axes else "runs"
    lines = [f"- **Best family: {best.family}**, validation accuracy {best.best_val_accuracy:.4f}, test accuracy "
             f"{best.test_accuracy_mean:.4f} ± {best.test_accuracy_std:.4f} over {int(best.runs)} {repeats}, "
             f"{best.fit_seconds:.1f} s of training, {int(best.parameters):,} parameters, {best.model_size_mb:.1f} MB."]
    headline = {"best_family_test_accuracy": float(best.test_accuracy_mean),
                "best_family_val_accuracy": float(best.best_val_accuracy)}
    tutorial = ranking[ranking["family"] == "tutorial"]
    if len(tutorial) and best.family != "tutorial":
        base = tutorial.iloc[0]
        lines.append(f"- **Against the tutorial's model**: {100 * (best.test_accuracy_mean - base.test_accuracy_mean):+.2f} "
                     f"points of test accuracy ({base.test_accuracy_mean:.4f}), with {best.fit_seconds / base.fit_seconds:.2f}x "
                     f"its training time, {best.parameters / base.parameters:.1f}x its parameters and "
                     f"{best.model_size_mb / base.model_size_mb:.1f}x its size on disk.")
        headline["best_family_gain_points"] = float(100 * (best.test_accuracy_mean - base.test_accuracy_mean))
    lines += [*champion, "", "## Ranking", "", markdown(ranking), "", "## Overfitting, family by family", ""]
    for family, runs in sweep.done.groupby(sweep.family):
        rises = [rise(sweep, run_id) for run_id in runs["run_id"]]
        epochs, lowest = int(runs[BUDGET].max()), float(runs["min_val_loss_epoch"].median())
        after = (f"then rises by {np.median(rises):.3f} to the last epoch: it overfits after epoch {lowest:g}"
                 if lowest < epochs else "and is still falling at the last epoch: it does not overfit yet")
        lines.append(f"- **{family}**: validation loss is lowest at epoch {lowest:g} of {epochs} (median over {repeats}), "
                     f"{after}; the final train-validation accuracy gap is "
                     f"{100 * float(runs['final_accuracy_gap'].median()):.1f} points.")
    headline["median_min_val_loss_epoch"] = float(sweep.done["min_val_loss_epoch"].median())
    return headline, lines


def chosen(sweep: Sweep, best: pd.Series, best_run: str) -> tuple[dict, list[str]]:
    numbers = {"best_test_accuracy": float(best["test_accuracy"]), "best_val_accuracy": float(best["best_val_accuracy"])}
    job = (f"`{best['job']}` (run `{best_run}`), best validation accuracy {best['best_val_accuracy']:.4f}, "
           f"test accuracy {best['test_accuracy']:.4f}.")
    if sweep.family:
        return numbers, [f"- **Champion** (the best family's job of the highest validation accuracy): {job}"]
    setting, _ = best_setting(sweep)
    if setting is None:
        return numbers, [f"- **Best job** (highest validation accuracy): {job}"]
    return numbers, [
        f"- **Best setting** (highest mean validation accuracy over {int(setting['seeds'])} seeds): "
        f"{setting_name(setting, sweep.settings)}, validation accuracy {setting['best_val_accuracy_mean']:.4f} ± "
        f"{setting['best_val_accuracy_std']:.4f}, test accuracy {setting['test_accuracy_mean']:.4f} ± "
        f"{setting['test_accuracy_std']:.4f}. **Best job**, its seed of the highest validation accuracy: {job}"]


def reference(best: pd.Series, early: dict | None) -> tuple[dict, list[str]]:
    if not early:
        return {}, []
    delta = 100 * (early["test_accuracy"] - best["test_accuracy"])
    return ({"early_stopping_test_accuracy": float(early["test_accuracy"]),
             "early_stopping_stopped_epoch": float(early["stopped_epoch"])},
            [f"- **Early stopping** (`{early['job']}`) stopped at epoch {early['stopped_epoch']} and kept epoch "
             f"{early['best_epoch']}'s weights: test accuracy {early['test_accuracy']:.4f}, {delta:+.2f} points against "
             "the sweep's best job, with no epoch budget to choose."])


def axes_section(sweep: Sweep) -> tuple[dict, list[str]]:
    """Per axis: where best validation accuracy is highest and lowest, when validation loss bottoms out."""
    lines = []
    for axis in sweep.settings:
        if axis == sweep.family:
            continue  # the ranking is this axis's table
        table = by_axis(sweep, axis)
        accuracy = table.set_index(axis)["best_val_accuracy"]
        epoch = table.set_index(axis)["min_val_loss_epoch"].dropna()
        if accuracy.nunique() > 1:
            text = (f"Best validation accuracy is highest at {show(accuracy.idxmax())} ({accuracy.max():.4f}) and lowest "
                    f"at {show(accuracy.idxmin())} ({accuracy.min():.4f}), as the mean over each value's jobs")
        else:
            text = f"Best validation accuracy is {accuracy.iloc[0]:.4f} at every value (the mean over its jobs)"
        if len(epoch) and epoch.nunique() > 1:
            text += (f"; validation loss is lowest soonest at {show(epoch.idxmin())} (epoch {epoch.min():g}) and latest "
                     f"at {show(epoch.idxmax())} (epoch {epoch.max():g}), as the median")
        elif len(epoch):
            text += f"; validation loss is lowest at epoch {epoch.iloc[0]:g} at every value"
        text += "."
        if isinstance(sweep.labels[axis].dtype, pd.CategoricalDtype):
            text += " Its values are grouped in thirds, by rank."
        rho = [rank_correlation(sweep, axis, outcome) for outcome in ("best_val_accuracy", "min_val_loss_epoch")]
        if continuous(sweep.table[axis], sweep.written.get(axis, "")) and not np.isnan(rho).all():  # (NaN: too few jobs)
            said = [f"{value:+.2f}" if value == value else "none (it does not vary)" for value in rho]
            text += (f" Rank correlation (Spearman) with the value: best validation accuracy {said[0]}, epoch of "
                     f"the lowest validation loss {said[1]}.")
        lines += ["", f"### `{axis}` ({sweep.written.get(axis, '')})", "", text, "", markdown(table, (axis,))]
    return {}, (["", "## Along each axis"] + lines) if lines else []


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


def markdown(frame: pd.DataFrame, exact: tuple[str, ...] = ()) -> str:
    """A table; numbers to 4 decimals, except settings (`exact`) and epochs, shown as they are."""
    def cell(value, column: str) -> str:
        if isinstance(value, float) and (column in exact or column in WHOLE or column.endswith(("epoch", "epochs"))):
            return show(value)
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "/").replace("\n", " ")

    columns = [str(column) for column in frame.columns]
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(v, c) for v, c in zip(row, columns)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
