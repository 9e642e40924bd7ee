"""The sweep analysis's figures, named by the axes: figures(sweep) -> {file name: matplotlib Figure}.

val_loss_by_<axis>.png: every whole-budget curve (each setting's longest), coloured by the axis's value (or
third), dots at the minimum; by `family` for a sweep over build, by job when no setting varies.
best_val_accuracy_by_<axis>.png; test_accuracy_by_fit.epochs.png when the budget is swept (of the best and the
last epoch's model, where the runs measured both); test_accuracy_by_training_seconds.png for a family ranking.
Pure: no MLflow; no pyplot (a caller's backend and figures are its own).
"""

from __future__ import annotations

import pandas as pd

from pipeline.analysis_axes import BEST, BUDGET, LAST, Sweep, served_model, show, tested


def figures(sweep: Sweep) -> dict[str, object]:
    out = {}
    overlaid = [axis for axis in sweep.settings if axis != BUDGET]  # a budget's curves are the longest's start
    for axis in overlaid:
        name = "family" if axis == sweep.family else axis
        out[f"val_loss_by_{name}.png"] = val_loss(sweep, sweep.labels[axis], name, by_family=axis == sweep.family)
    if not overlaid:
        out["val_loss_by_job.png"] = val_loss(sweep, sweep.table["job"], "job")
    for axis in sweep.settings:
        if axis != sweep.family:  # the ranking's figure below says it for families
            out[f"best_val_accuracy_by_{axis}.png"] = accuracy_by(sweep, axis)
    if BUDGET in sweep.axes:
        out[f"test_accuracy_by_{BUDGET}.png"] = by_budget(sweep)
    if sweep.family:
        out["test_accuracy_by_training_seconds.png"] = by_seconds(sweep)
    return out


def ordered(labels: pd.Series) -> list:
    if isinstance(labels.dtype, pd.CategoricalDtype):
        return [value for value in labels.cat.categories if (labels == value).any()]
    return sorted(labels.dropna().unique(), key=lambda value: (isinstance(value, str), value))


def colours() -> list[str]:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 8


def new_axes():
    """A Figure of its own and its axes: drawn without pyplot, so a notebook's backend and figures are left alone."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    return figure, figure.subplots()


def val_loss(sweep: Sweep, labels: pd.Series, name: str, by_family: bool = False):
    figure, axes = new_axes()
    curves = sweep.curves
    labels = labels[curves.index]
    for value, colour in zip(ordered(labels), colours()):
        for number, (_, row) in enumerate(curves[labels == value].iterrows()):
            history = sweep.histories[row["run_id"]]
            legend = (show(value) if by_family or name == "job" else f"{name}={show(value)}") if number == 0 else None
            axes.plot(history["epoch"], history["val_loss"], color=colour, alpha=0.8, label=legend)
            axes.plot(row["min_val_loss_epoch"], row["min_val_loss"], "o", color=colour)
    if by_family:  # the families train 2 to 40 epochs: each curve gets room
        axes.set_xscale("log")
        ticks = sorted({1, 2, 3, 5, 10, 20, int(curves["epochs_trained"].max())})
        axes.set_xticks(ticks, [str(tick) for tick in ticks])
    axes.set(title=f"Validation loss by epoch, by {name} (dots: minimum)", ylabel="Validation loss",
             xlabel="Epoch (log scale)" if by_family else "Epoch")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def accuracy_by(sweep: Sweep, axis: str):
    """Each whole-budget job's best validation accuracy against its value on `axis`, and each value's mean."""
    figure, axes = new_axes()
    done = sweep.done
    values = done[axis]
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if not numeric:
        order = ordered(values.astype(str))
        values = values.astype(str).map({value: position for position, value in enumerate(order)})
        axes.set_xticks(range(len(order)), order)
    axes.scatter(values, done["best_val_accuracy"], alpha=0.6, label="jobs")
    if values.nunique() < len(values):  # repeats at a value: their mean
        means = done.groupby(values)["best_val_accuracy"].mean()
        axes.plot(means.index, means.to_numpy(), "D-", label="mean")
    if numeric and "log" in sweep.written.get(axis, "") and (values > 0).all():
        axes.set_xscale("log")
    axes.set(title=f"Best validation accuracy by {axis}", xlabel=axis, ylabel="Best validation accuracy")
    axes.legend()
    figure.tight_layout()
    return figure


def by_budget(sweep: Sweep):
    """Test accuracy against the epoch budget, a line per setting of the other axes: of the best epoch's model
    (solid) and the last epoch's (dashed) where the runs measured both, else of the served model."""
    figure, axes = new_axes()
    others = [axis for axis in sweep.axes if axis != BUDGET]
    groups = sweep.done.groupby(others, dropna=False) if others else [((), sweep.done)]
    models = tested(sweep)
    for (key, group), colour in zip(groups, colours()):
        group = group.groupby(BUDGET)[[column for column, _ in models]].mean()  # (seeds: their mean)
        label = ",".join(f"{axis}={show(value)}" for axis, value in zip(others, key if others else ())) or "every job"
        for (column, _), style in zip(models, ("o-", "s--")):
            which = {BEST: "best epoch", LAST: "last epoch"}.get(column)
            axes.plot(group.index, group[column], style, color=colour, label=f"{label}, {which}" if which else label)
    if others:  # the mean over each budget's jobs: the numbers of the report's fit.epochs table
        means = sweep.done.groupby(BUDGET)[[column for column, _ in models]].mean()
        for (column, _), style in zip(models, ("o-", "s--")):
            which = {BEST: ", best epoch", LAST: ", last epoch"}.get(column, "")
            axes.plot(means.index, means[column], style, color="black", linewidth=2.5, label=f"mean{which}")
    named = {BEST: "solid: each run's best-epoch model; dashed: its last epoch's", "test_accuracy": served_model(sweep)}
    axes.set(title=f"Test accuracy by epoch budget ({BUDGET})\n{named[models[0][0]]}", xlabel="Epoch budget",
             ylabel="Test accuracy")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def by_seconds(sweep: Sweep):
    figure, axes = new_axes()
    for (family, runs), colour in zip(sweep.done.groupby(sweep.family), colours()):
        axes.scatter(runs["fit_seconds"], runs["test_accuracy"], color=colour, alpha=0.5)
        axes.plot(runs["fit_seconds"].mean(), runs["test_accuracy"].mean(), "D", color=colour, label=family)
    axes.set_xscale("log")
    axes.set(title="Test accuracy against training time (dots: runs; diamonds: means)",
             xlabel="Training seconds (log scale)", ylabel="Test accuracy")
    axes.legend()
    figure.tight_layout()
    return figure
