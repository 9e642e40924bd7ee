"""The words the sweep report's sections share: a difference's caveats, a spread (or that one run has none), a
Markdown table. Pure: no MLflow, no plotting.
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
