"""Batch scoring: reviews in a file in, labelled probabilities out.

`python -m pipeline.score MODEL_URI INPUT [-o OUTPUT]` reads a table with a text column (.csv, .tsv,
.jsonl, .parquet) or a .txt file with one review per line, scores every review with a logged or
registered raw-text model and writes a CSV with the file's columns, the probability of a positive review and
the label at the threshold (`predicted_probability`, `predicted_label` where the file has a column of that
name, such as its true labels). The file is checked before the model loads: a missing column, an empty cell or
a column of numbers is one line naming the file, the row and the fix (--verbose adds the traceback); Ctrl-C
ends it with one line, exit status 130, and no half-written output.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (pandas is imported by the functions, inside main's handling of Ctrl-C)
    import pandas as pd

USER_ERRORS = (ValueError, OSError)  # a file, a column, a row or the model's URI (MlflowException: below)


def read_reviews(path: Path, column: str) -> pd.DataFrame:
    """The file's rows; refused, naming the file and the fix, unless every row of `column` holds a review."""
    import pandas as pd

    from pipeline.tables import counting, not_text, read_frame, row_names, text_column

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give a .csv, .tsv, .jsonl or .parquet table with a "
                                f"column {column!r}, or a .txt file with a review per line")
    if path.suffix == ".txt":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        frame = pd.DataFrame({column: lines})
    else:
        frame = read_frame(path)
    texts = text_column(frame, column, path, "name the column of reviews with --text-column")
    bad = [(name, why) for name, text in zip(row_names(frame), texts) if (why := not_text(text))]
    if bad:
        (where, why), more = bad[0], f" ({len(bad)} such rows in all)" if len(bad) > 1 else ""
        row = where if where.startswith("line") else f"row {where} ({counting(path)})"
        raise ValueError(f"{path}: {row} has {why} in column {column!r}{more}; write a review there, "
                         "or remove the row")
    if frame.empty:
        raise ValueError(f"{path} holds no reviews")
    return frame


OUTPUTS = ("probability", "label")  # the columns scoring adds; one the input already has is kept, ours prefixed


def outputs(columns) -> tuple[str, str]:
    """The names scoring gives its probability and label columns beside the input's `columns`."""
    probability, label = (f"predicted_{name}" if name in columns else name for name in OUTPUTS)
    return probability, label


def score(model, frame: pd.DataFrame, text_column: str, threshold: float) -> pd.DataFrame:
    """The input rows, every column kept, with `probability` (of a positive review) and `label` (positive/negative)
    added: `predicted_probability` and `predicted_label` where the input has a column of that name (a table's true
    labels, kept to compare with)."""
    out = frame.copy()
    probability, label = outputs(frame.columns)
    out[probability] = model.predict(frame[[text_column]])
    out[label] = (out[probability] > threshold).map({True: "positive", False: "negative"})
    return out


def write(scored: pd.DataFrame, output: Path | None) -> None:
    """To standard output, or to `output` whole: written beside it, then put in its place."""
    if output is None:
        scored.to_csv(sys.stdout, index=False)
        return
    partial = output.with_name(f".{output.name}.partial")
    try:
        scored.to_csv(partial, index=False)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> None:
    frame = read_reviews(args.input, args.text_column)  # (before MLflow and TensorFlow load)
    from pipeline.console import CONSOLE

    CONSOLE.install(args.verbose)  # TensorFlow's start-up lines to a log, not the terminal (unless --verbose)
    import mlflow

    model = mlflow.pyfunc.load_model(args.model_uri)
    scored = score(model, frame, args.text_column, args.threshold)
    write(scored, args.output)
    if args.output is not None:  # (to standard output, the CSV alone)
        label = outputs(frame.columns)[1]
        positive = int((scored[label] == "positive").sum())
        print(f"scored {len(scored):,} reviews of {args.input} with {args.model_uri}: {positive:,} positive, "
              f"{len(scored) - positive:,} negative (column {label}); written to {args.output}", file=sys.stderr,
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_uri", help="e.g. models:/imdb-sentiment@champion, models:/m-..., runs:/<id>/model")
    parser.add_argument("input", type=Path, help="a CSV/Parquet file with a text column, or a .txt file, one review a line")
    parser.add_argument("-o", "--output", type=Path, help="where to write the CSV (default: standard output)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--verbose", action="store_true", help="show the libraries' output and an error's traceback")
    args = parser.parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"SIGINT: stopped; {'nothing written' if args.output is None else f'{args.output} not written'}",
              file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:
        from_mlflow = type(error).__module__.startswith("mlflow")  # e.g. a model URI that names no model
        if not isinstance(error, USER_ERRORS) and not from_mlflow:
            raise
        if args.verbose:
            traceback.print_exception(error)
        else:
            print(f"{type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
