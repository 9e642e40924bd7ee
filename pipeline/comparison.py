"""Which model family to use, and what it costs: the ranking of a sweep over build=<family>.

In: the sweep analysis's table (one row per finished job, with its family, seed, training seconds,
parameters and model size) and each job's per-epoch history. Out: the ranking (one row per family, best
first), two figures and the report's comparison section. The best family is the one of the highest mean
validation accuracy: the test split is reported, never used to choose. Pure, like pipeline.analysis.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.analysis import Analysis, failed_section, jobs_table, markdown

RANKING_COLUMNS = ["family", "runs", "test_accuracy_mean", "test_accuracy_std", "best_val_accuracy",
                   "min_val_loss_epoch", "epochs", "fit_seconds", "parameters", "model_size_mb"]


def compare(rows: list[dict], histories: dict[str, pd.DataFrame], failed: list[dict]) -> Analysis:
    """The Analysis of a sweep whose jobs train several families (rows from analysis.job_row, with family,
    seed, fit_seconds, parameters and model_size_mb)."""
    table = jobs_table(rows)
    result = Analysis(table=table, failed=pd.DataFrame(failed, columns=["job", "run_id", "error"]))
    result.ranking = rank(table)
    result.best_run = best_run(table, result.ranking)
    result.figures = figures(table, histories)
    result.headline, result.report = report(table, result.ranking, histories)
    result.headline.update(jobs_finished=float(len(table)), jobs_failed=float(len(failed)))
    result.report += "\n## Jobs\n\n" + markdown(table.drop(columns=["run_id"])) + "\n" + failed_section(result.failed)
    return result


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """One row per family: mean and spread (standard deviation over seeds) of test accuracy, mean best
    validation accuracy, median epoch of the lowest validation loss, mean training seconds, size."""
    groups = table.groupby("family")
    ranking = pd.DataFrame({
        "runs": groups.size(), "test_accuracy_mean": groups["test_accuracy"].mean(),
        "test_accuracy_std": groups["test_accuracy"].std(ddof=0), "best_val_accuracy": groups["best_val_accuracy"].mean(),
        "min_val_loss_epoch": groups["min_val_loss_epoch"].median(), "epochs": groups["epochs"].max(),
        "fit_seconds": groups["fit_seconds"].mean(), "parameters": groups["parameters"].max(),
        "model_size_mb": groups["model_size_mb"].max()}).reset_index()
    return ranking.sort_values(["best_val_accuracy", "family"], ascending=[False, True], ignore_index=True)[RANKING_COLUMNS]


def best_run(table: pd.DataFrame, ranking: pd.DataFrame) -> str:
    """The best family's run of the highest validation accuracy (what the champion alias points at)."""
    runs = table[table["family"] == ranking["family"].iloc[0]]
    return runs.loc[runs["best_val_accuracy"].idxmax(), "run_id"]


def figures(table: pd.DataFrame, histories: dict[str, pd.DataFrame]) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colors = dict(zip(sorted(table["family"].unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    out = {}
    figure, axes = plt.subplots(figsize=(8, 5))
    for family, runs in table.groupby("family"):
        axes.scatter(runs["fit_seconds"], runs["test_accuracy"], color=colors[family], alpha=0.5)
        axes.plot(runs["fit_seconds"].mean(), runs["test_accuracy"].mean(), "D", color=colors[family], label=family)
    axes.set_xscale("log")
    axes.set(title="Test accuracy against training time (dots: seeds; diamonds: means)",
             xlabel="Training seconds (log scale)", ylabel="Test accuracy")
    axes.legend()
    figure.tight_layout()
    out["test_accuracy_by_training_seconds.png"] = figure

    figure, axes = plt.subplots(figsize=(8, 5))
    for family, runs in table.groupby("family"):
        for number, run_id in enumerate(runs["run_id"]):
            history = histories[run_id]
            axes.plot(history["epoch"], history["val_loss"], color=colors[family], alpha=0.8,
                      label=family if number == 0 else None)
    axes.set_xscale("log")  # the families train 2 to 40 epochs: each curve gets room
    ticks = sorted({1, 2, 3, 5, 10, 20, int(table["epochs"].max())})
    axes.set_xticks(ticks, [str(tick) for tick in ticks])
    axes.set(title="Validation loss by epoch, every family and seed", xlabel="Epoch (log scale)",
             ylabel="Validation loss")
    axes.legend()
    figure.tight_layout()
    out["val_loss_by_family.png"] = figure
    return out


def report(table: pd.DataFrame, ranking: pd.DataFrame, histories: dict[str, pd.DataFrame]) -> tuple[dict, str]:
    """(headline metrics, Markdown): the ranking, the chosen family against the tutorial, overfitting."""
    best = ranking.iloc[0]
    lines = ["# Model comparison: which family, at what cost?", "",
             f"{len(table)} jobs finished, {len(ranking)} families, chosen by mean best validation accuracy "
             "(the test split chooses nothing).", "",
             f"- **Best family: {best.family}**, validation accuracy {best.best_val_accuracy:.4f}, test accuracy "
             f"{best.test_accuracy_mean:.4f} ± {best.test_accuracy_std:.4f} over {int(best.runs)} seeds, "
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
    lines += ["", "## Ranking", "", markdown(ranking), "", "## Overfitting, family by family", ""]
    for family, runs in table.groupby("family"):
        rises = [float(histories[r]["val_loss"].iloc[-1] - histories[r]["val_loss"].min()) for r in runs["run_id"]]
        epochs, lowest = int(runs["epochs"].max()), float(runs["min_val_loss_epoch"].median())
        after = (f"then rises by {np.median(rises):.3f} to the last epoch: it overfits after epoch {lowest:g}"
                 if lowest < epochs else "and is still falling at the last epoch: it does not overfit yet")
        lines.append(f"- **{family}**: validation loss is lowest at epoch {lowest:g} of {epochs} (median over seeds), "
                     f"{after}; the final train-validation accuracy gap is "
                     f"{100 * float(runs['final_accuracy_gap'].median()):.1f} points.")
    return headline, "\n".join(lines) + "\n"

