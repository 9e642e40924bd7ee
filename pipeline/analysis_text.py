"""The words the sweep report's sections share: a difference's caveats, a spread (or that one run has none), a
Markdown table; and what the jobs' shared trainings saved. Pure: no MLflow, no plotting.
"""

from __future__ import annotations

import pandas as pd

from pipeline.analysis_axes import show

WHOLE = ("epochs_trained", "parameters", "trial", "runs", "seeds", "jobs")  # counts: shown without decimals


def caveat(caveats: list[str]) -> str:
    """A difference's weak points, said after it: then it is not a finding."""
    return f" Not a finding: {'; '.join(caveats)}." if caveats else ""


def spread_of(std: float, runs: float, repeats: str) -> str:
    """" ± 0.0040 over 3 seeds" (a standard deviation), or, for one run, that there is no spread."""
    if runs < 2 or pd.isna(std):
        return f" (one {repeats[:-1]}: no spread)"
    return f" ± {std:.4f} over {int(runs)} {repeats}"


def markdown(frame: pd.DataFrame, exact: tuple[str, ...] = ()) -> str:
    """A table; numbers to 4 decimals, except settings (`exact`) and epochs, shown as they are."""
    def cell(value, column: str) -> str:
        if isinstance(value, float) and value != value:
            return "–"  # none: e.g. the spread of one run
        if isinstance(value, float) and (column in exact or column in WHOLE or column.endswith(("epoch", "epochs"))):
            return show(value)
        return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "/").replace("\n", " ")

    columns = [str(column) for column in frame.columns]
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(cell(v, c) for v, c in zip(row, columns)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def shared_trainings(table: pd.DataFrame) -> tuple[dict, list[str]]:
    """What sharing a training between a setting's fit.epochs budgets saved (pipeline/budgets.py): how many jobs were
    recorded from how many trainings, and the epochs not trained again, each at the median epoch time of its
    training's longest budget (a short budget's median is its compiling first epoch's)."""
    if "training" not in table or table["training"].isna().all():
        return {}, []
    own = table["training"].fillna(table["run_id"])  # a job that trained alone is a training of its own
    longest = table.groupby(own)["epochs_trained"].transform("max")
    repeated = table["epochs_trained"].where(table["epochs_trained"] < longest, 0)  # a shorter budget's epochs
    asked, saved = int(table["epochs_trained"].sum()), int(repeated.sum())
    pace = table["epoch_seconds"].where(table["epochs_trained"] == longest).groupby(own).transform("max")
    seconds = float((repeated * pace).sum())
    return ({"trainings": float(own.nunique()), "epochs_not_repeated": float(saved)},
            ["", "## Shared trainings", "",
             f"- **{len(table)} budgets recorded from {own.nunique()} training{'s' * (own.nunique() != 1)}; {saved} of "
             f"{asked} epochs not repeated** (about {seconds:.0f} s of training, each epoch at the median epoch "
             "time of its training's longest budget): the jobs of a setting that differ only in `fit.epochs` share a "
             "training, to the longest budget (a resume trains again for the budgets still missing), and each budget "
             "is its own run with the numbers a "
             "training of that budget alone gives (its tag `pipeline.training` names the run the training started in; "
             "`sweep.share_budgets=false` trains each alone)."])
