"""The sweep analysis, for any sweep: the swept keys (its axes) drive the table, the report and the figures.

In: the axes (dotted key -> values as written), one row per finished job (job_row), each job's per-epoch
history, the jobs that failed and the early-stopped reference job, if any. Out: Analysis: the jobs table (a
column per axis), the ranking when `build` is swept, figures (analysis_figures) and a Markdown report
(analysis_report), from the numbers of analysis_axes. Pure: reading and writing runs is pipeline.tracking.sweeps'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import analysis_figures, analysis_report
from pipeline.analysis_axes import BUDGET, OUTCOMES, RANKING_COLUMNS, SEED, best_setting, rank, survey

__all__ = ["BUDGET", "RANKING_COLUMNS", "SEED", "Analysis", "analyze", "job_row", "jobs_table"]


@dataclass
class Analysis:
    table: pd.DataFrame  # one row per job: job, a column per axis, OUTCOMES, then the rest, run_id last
    failed: pd.DataFrame  # job, run_id, error of each job that did not finish
    axes: list[str] = field(default_factory=list)  # the swept keys whose values differ between finished jobs
    figures: dict[str, object] = field(default_factory=dict)  # file name -> matplotlib Figure
    report: str = ""  # Markdown
    headline: dict[str, float] = field(default_factory=dict)  # parent metrics, named for the model they measure
    best_run: str | None = None  # by validation accuracy (a comparison: the best family's best run)
    ranking: pd.DataFrame | None = None  # a sweep over build: one row per family, best first


def job_row(job: str, run_id: str, settings: dict, history: pd.DataFrame, test_accuracy: float,
            status: str = "FINISHED", **extra) -> dict:
    """One table row. `settings`: each axis's value by its dotted key, and fit.epochs (the job's budget);
    `history`: columns epoch, loss, accuracy, val_loss, val_accuracy; `extra`: pruned, trial, epochs_trained,
    epoch_seconds (the median), fit_seconds, parameters, model_size_mb, family and family_epochs (its own budget),
    served (evaluate.serve), best_epoch, last_epoch and each one's test accuracy (best_epoch_test_accuracy,
    last_epoch_test_accuracy), as known."""
    best = history.loc[history["val_loss"].idxmin()]
    last = history.iloc[-1]
    return {"job": job, **settings, "status": status, "pruned": False, "epochs_trained": len(history),
            "min_val_loss_epoch": int(best["epoch"]), "min_val_loss": float(best["val_loss"]),
            "best_val_accuracy": float(history["val_accuracy"].max()),
            "final_accuracy_gap": float(last["accuracy"] - last["val_accuracy"]),
            "test_accuracy": float(test_accuracy), "run_id": run_id, **extra}


def analyze(axes: dict[str, str], rows: list[dict], histories: dict[str, pd.DataFrame], failed: list[dict],
            early_stopping: dict | None = None) -> Analysis:
    """The table, figures and report of a sweep over `axes` (dotted key -> values as written, in sweep order).
    `histories` are keyed by run_id; `early_stopping` (optional) describes the early-stopped reference job:
    job, stopped_epoch, best_epoch, test_accuracy."""
    table = jobs_table(list(axes), rows)
    result = Analysis(table=table, failed=pd.DataFrame(failed, columns=["job", "run_id", "error"]))
    if table.empty:
        result.report = "# Sweep analysis\n\nNo job finished.\n" + analysis_report.failed_section(result.failed)
        return result
    sweep = survey(table, axes, histories)
    result.axes = sweep.axes
    if sweep.family:
        result.ranking = rank(sweep)
        runs = sweep.done[sweep.done[sweep.family] == result.ranking["family"].iloc[0]]
        result.best_run = runs.loc[runs["best_val_accuracy"].idxmax(), "run_id"]
    else:
        result.best_run = best_setting(sweep)[1]["run_id"]
    result.headline, result.report = analysis_report.report(sweep, result.failed, result.ranking, result.best_run,
                                                            early_stopping)
    result.figures = analysis_figures.figures(sweep)
    return result


def jobs_table(axes: list[str], rows: list[dict]) -> pd.DataFrame:
    """job_row's rows as a table: job, the axes, OUTCOMES, the rest, run_id; by the axes' values, then job."""
    first = ["job", *axes]
    outcomes = [column for column in OUTCOMES if column not in axes]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=first + outcomes + ["run_id"])
    for column in first + outcomes:
        if column not in table:
            table[column] = np.nan
    for axis in axes:  # params arrive as text: numbers where every value is one
        numbers = pd.to_numeric(table[axis], errors="coerce")
        if numbers.notna().sum() == table[axis].notna().sum():
            table[axis] = numbers
    table["pruned"] = table["pruned"].fillna(False).astype(bool)
    rest = [column for column in table.columns if column not in first + outcomes + ["run_id"]]
    return table[first + outcomes + rest + ["run_id"]].sort_values([*axes, "job"], ignore_index=True)


