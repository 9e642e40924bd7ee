"""The sweep analysis: what a grid over hidden units and epochs says about overfitting (a sweep over
model families is pipeline.comparison's, which builds on this module).

In: one row per child run (its settings, status and final metrics) and each finished child's per-epoch
history. Out: Analysis, a table (one row per job), figures (validation loss against epoch for each
hidden size, overlaid; test accuracy against the epoch budget for each hidden size) and a Markdown report that states the finding with the measured numbers. Pure:
reading and writing runs is pipeline.tracking's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

TABLE_COLUMNS = ["job", "hidden_units", "epochs", "status", "min_val_loss_epoch", "min_val_loss",
                 "best_val_accuracy", "final_accuracy_gap", "test_accuracy", "run_id"]


@dataclass
class Analysis:
    table: pd.DataFrame  # one row per job, TABLE_COLUMNS first
    failed: pd.DataFrame  # job, run_id, error of each job that did not finish
    figures: dict[str, object] = field(default_factory=dict)  # file name -> matplotlib Figure
    report: str = ""  # Markdown
    headline: dict[str, float] = field(default_factory=dict)  # numbers worth logging as parent metrics
    best_run: str | None = None  # the job of the highest validation accuracy (comparison: of the best family)
    ranking: pd.DataFrame | None = None  # with several families: one row per family, best first


def job_row(job: str, run_id: str, hidden_units: int, epochs: int, history: pd.DataFrame,
            test_accuracy: float, status: str = "FINISHED", **extra) -> dict:
    """One table row from a finished job's history (columns epoch, loss, accuracy, val_loss, val_accuracy)."""
    best = history.loc[history["val_loss"].idxmin()]
    last = history.iloc[-1]
    return {"job": job, "hidden_units": hidden_units, "epochs": epochs, "status": status,
            "min_val_loss_epoch": int(best["epoch"]), "min_val_loss": float(best["val_loss"]),
            "best_val_accuracy": float(history["val_accuracy"].max()),
            "final_accuracy_gap": float(last["accuracy"] - last["val_accuracy"]),
            "test_accuracy": float(test_accuracy), "run_id": run_id, **extra}


def analyze(rows: list[dict], histories: dict[str, pd.DataFrame], failed: list[dict],
            early_stopping: dict | None = None) -> Analysis:
    """Build the table, figures and report. `rows` come from job_row; `histories` are keyed by run_id;
    `early_stopping` (optional) describes an early-stopped job: job, stopped_epoch, best_epoch, test_accuracy."""
    analysis = Analysis(table=jobs_table(rows), failed=pd.DataFrame(failed, columns=["job", "run_id", "error"]))
    table, failed_table = analysis.table, analysis.failed
    if not table.empty:
        analysis.figures = figures(table, histories)
        analysis.headline, analysis.report = report(table, failed_table, early_stopping)
        analysis.best_run = table.loc[table["best_val_accuracy"].idxmax(), "run_id"]
    else:
        analysis.report = "# Sweep analysis\n\nNo job finished.\n" + failed_section(failed_table)
    return analysis


def jobs_table(rows: list[dict]) -> pd.DataFrame:
    """job_row's rows as a table, TABLE_COLUMNS first, by hidden units, epochs and job."""
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    table = table[TABLE_COLUMNS + [c for c in table.columns if c not in TABLE_COLUMNS]]
    return table.sort_values(["hidden_units", "epochs", "job"], ignore_index=True)


def _longest(table: pd.DataFrame) -> pd.DataFrame:
    """For each hidden size, the job that trained longest (its curve contains the shorter budgets')."""
    return table.sort_values("epochs").groupby("hidden_units", as_index=False).tail(1).sort_values("hidden_units")


def figures(table: pd.DataFrame, histories: dict[str, pd.DataFrame]) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = {}
    figure, axes = plt.subplots(figsize=(8, 5))
    for _, row in _longest(table).iterrows():
        history = histories[row["run_id"]]
        line, = axes.plot(history["epoch"], history["val_loss"], label=f"hidden_units={row['hidden_units']}")
        axes.plot(row["min_val_loss_epoch"], row["min_val_loss"], "o", color=line.get_color())
    axes.set(title="Validation loss by epoch, per hidden size (dots: minimum)", xlabel="Epoch",
             ylabel="Validation loss")
    axes.legend()
    figure.tight_layout()
    out["val_loss_by_hidden_units.png"] = figure

    figure, axes = plt.subplots(figsize=(8, 5))
    for hidden, group in table.groupby("hidden_units"):
        group = group.sort_values("epochs")
        axes.plot(group["epochs"], group["test_accuracy"], "o-", label=f"hidden_units={hidden}")
    axes.set(title="Test accuracy by epoch budget, per hidden size", xlabel="Epochs trained",
             ylabel="Test accuracy")
    axes.legend()
    figure.tight_layout()
    out["test_accuracy_by_epochs.png"] = figure
    return out


def report(table: pd.DataFrame, failed: pd.DataFrame, early_stopping: dict | None) -> tuple[dict, str]:
    longest = _longest(table)
    median_epoch = float(np.median(longest["min_val_loss_epoch"]))
    max_epochs = int(table["epochs"].max())
    # what training to the largest budget costs, per hidden size: best budget's test accuracy minus the largest's
    costs = []
    for _, group in table.groupby("hidden_units"):
        if group["epochs"].nunique() > 1:
            at_max = group.loc[group["epochs"] == group["epochs"].max(), "test_accuracy"].max()
            costs.append(group["test_accuracy"].max() - at_max)
    cost_points = 100 * float(np.median(costs)) if costs else float("nan")
    best = table.loc[table["best_val_accuracy"].idxmax()]
    smallest, largest = longest.iloc[0], longest.iloc[-1]
    if largest["min_val_loss_epoch"] < smallest["min_val_loss_epoch"]:
        trend = "sooner"
    elif largest["min_val_loss_epoch"] > smallest["min_val_loss_epoch"]:
        trend = "later"
    else:
        trend = "at the same epoch"
    headline = {"median_min_val_loss_epoch": median_epoch, "max_epochs_cost_points": cost_points,
                "best_test_accuracy": float(best["test_accuracy"]), "jobs_finished": float(len(table)),
                "jobs_failed": float(len(failed))}

    lines = ["# Sweep analysis: where does the model start to overfit?", ""]
    lines.append(f"{len(table)} jobs finished" + (f", {len(failed)} failed" if len(failed) else "") + ".")
    lines.append("")
    lines.append(f"- **Validation loss is lowest at epoch {median_epoch:g}** (median over hidden sizes, "
                 f"each at its longest budget); per hidden size: " + ", ".join(
                     f"{int(r.hidden_units)} units -> epoch {int(r.min_val_loss_epoch)}" for r in longest.itertuples()) + ".")
    if costs:
        lines.append(f"- **Training to {max_epochs} epochs instead of the best budget costs {cost_points:.2f} points of "
                     "test accuracy** (median over hidden sizes).")
    if len(longest) > 1:
        lines.append(f"- Larger hidden layers overfit {trend}: {int(largest.hidden_units)} units reach their lowest "
                     f"validation loss at epoch {int(largest.min_val_loss_epoch)}, {int(smallest.hidden_units)} units "
                     f"at epoch {int(smallest.min_val_loss_epoch)}; the final train-validation accuracy gap is "
                     f"{100 * largest.final_accuracy_gap:.1f} vs {100 * smallest.final_accuracy_gap:.1f} points.")
    lines.append(f"- **Best job** (highest validation accuracy): `{best['job']}` (run `{best['run_id']}`), "
                 f"best validation accuracy {best['best_val_accuracy']:.4f}, test accuracy {best['test_accuracy']:.4f}.")
    if early_stopping:
        delta = 100 * (early_stopping["test_accuracy"] - best["test_accuracy"])
        lines.append(f"- **Early stopping** (`{early_stopping['job']}`) stopped at epoch {early_stopping['stopped_epoch']} "
                     f"and kept epoch {early_stopping['best_epoch']}'s weights: test accuracy "
                     f"{early_stopping['test_accuracy']:.4f}, {delta:+.2f} points against the sweep's best job, "
                     "with no epoch budget to choose.")
        headline["early_stopping_test_accuracy"] = float(early_stopping["test_accuracy"])
        headline["early_stopping_stopped_epoch"] = float(early_stopping["stopped_epoch"])
    lines += ["", "## Jobs", "", markdown(table.drop(columns=["run_id"])), failed_section(failed)]
    return headline, "\n".join(lines) + "\n"


def failed_section(failed: pd.DataFrame) -> str:
    if failed.empty:
        return ""
    return "\n## Failed jobs\n\n" + markdown(failed) + "\n"


def markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "/").replace("\n", " ")

    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
