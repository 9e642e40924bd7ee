"""A sweep over `build` (or `build.family`), in words: the ranking, the chosen family against the tutorial's
model with the runs on each side, the families compared below their own epoch budget, each family's overfitting.
Pure: no MLflow, no plotting.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.analysis_axes import BUDGET, SEED, Sweep, contrast, model_key, rise, served_model
from pipeline.analysis_text import caveat, markdown, spread_of


def comparison(sweep: Sweep, ranking: pd.DataFrame, champion: list[str]) -> tuple[dict, list[str]]:
    """The ranking; the chosen family against the tutorial's model, with the runs on each side and whether the
    difference exceeds their spread; the families compared below their own epoch budget; each family's overfitting."""
    best, served = ranking.iloc[0], served_model(sweep)
    repeats = "seeds" if SEED in sweep.axes else "runs"
    lines = [f"- **Best family: {best.family}**, validation accuracy {best.best_val_accuracy:.4f}, test accuracy of "
             f"{served} {best.test_accuracy_mean:.4f}{spread_of(best.test_accuracy_std, best.runs, repeats)}, "
             f"{best.fit_seconds:.1f} s of training, {int(best.parameters):,} parameters, {best.model_size_mb:.1f} MB."]
    headline = {f"best_family.{model_key(sweep)}.test_accuracy_mean": float(best.test_accuracy_mean),
                "best_family.best_val_accuracy_mean": float(best.best_val_accuracy)}
    tutorial = ranking[ranking["family"] == "tutorial"]
    if len(tutorial) and best.family != "tutorial":
        base = tutorial.iloc[0]
        points = 100 * (best.test_accuracy_mean - base.test_accuracy_mean)
        spread = max((std for std in (best.test_accuracy_std, base.test_accuracy_std) if pd.notna(std)), default=np.nan)
        caveats = contrast(sweep, sweep.done, sweep.family, "tutorial", best.family, points / 100, spread)
        caveats += [f"{'the tutorial' if row.family == 'tutorial' else row.family}'s model trained {row.epochs:g} of "
                    f"its own {row.own_epochs:g} epochs" for row in (best, base) if below(row)]
        each = (f"one {repeats[:-1]} each" if best.runs == base.runs == 1 else
                f"the mean over {int(best.runs)} {repeats} vs {int(base.runs)}")
        lines.append(f"- **Against the tutorial's model**: {points:+.2f} points of test accuracy of {served} "
                     f"({best.test_accuracy_mean:.4f} against {base.test_accuracy_mean:.4f}, {each}), with "
                     f"{best.fit_seconds / base.fit_seconds:.2f}x its training time, "
                     f"{best.parameters / base.parameters:.1f}x its parameters and "
                     f"{best.model_size_mb / base.model_size_mb:.1f}x its size on disk." + caveat(caveats))
        headline[f"best_family.{model_key(sweep)}.points_vs_tutorial"] = float(points)
    short = [f"{row.family} {row.epochs:g} of its {row.own_epochs:g}" for row in ranking.itertuples() if below(row)]
    if short:
        lines.append("- **Compared below their own epoch budget** (their conf/build file's `fit.epochs`): "
                     + ", ".join(short) + ". Their numbers are not what the family reaches at its own budget.")
    lines += [*champion, "", "## Ranking", "", markdown(ranking), "", "## Overfitting, family by family", ""]
    for family, runs in sweep.done.groupby(sweep.family):
        rises = [rise(sweep, run_id) for run_id in runs["run_id"]]
        epochs, lowest = int(runs[BUDGET].max()), float(runs["min_val_loss_epoch"].median())
        after = (f"then rises by {np.median(rises):.3f} to the last epoch: it overfits after epoch {lowest:g}"
                 if lowest < epochs else "and is still falling at the last epoch: it does not overfit yet")
        over = f"median over {len(runs)} {repeats}" if len(runs) > 1 else f"one {repeats[:-1]}"
        lines.append(f"- **{family}**: validation loss is lowest at epoch {lowest:g} of {epochs} ({over}), "
                     f"{after}; the final train-validation accuracy gap is "
                     f"{100 * float(runs['final_accuracy_gap'].median()):.1f} points.")
    headline["median_min_val_loss_epoch"] = float(sweep.done["min_val_loss_epoch"].median())
    return headline, lines


def below(row) -> bool:
    """Whether a ranking row's family trained fewer epochs than its own budget (where known)."""
    return pd.notna(row.own_epochs) and row.epochs < row.own_epochs
