"""Batch scoring: reviews in a file in, labelled probabilities out.

`python -m pipeline.score MODEL_URI INPUT [-o OUTPUT]` reads a table with a text column (.csv, .tsv,
.jsonl, .parquet) or a .txt file with one review per line, scores every review with a logged or
registered raw-text model and writes a CSV with the text, the probability of a positive review and the
label at the threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.ingest import read_frame


def read_reviews(path: Path, text_column: str) -> pd.DataFrame:
    if path.suffix == ".txt":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return pd.DataFrame({text_column: lines})
    frame = read_frame(path)
    if text_column not in frame.columns:
        raise ValueError(f"{path}: no column {text_column!r} (found {list(frame.columns)}); pass --text-column")
    return frame


def score(model, frame: pd.DataFrame, text_column: str, threshold: float) -> pd.DataFrame:
    """The input rows with `probability` (of a positive review) and `label` (positive/negative) added."""
    out = frame.copy()
    out["probability"] = model.predict(frame[[text_column]].astype(str))
    out["label"] = (out["probability"] > threshold).map({True: "positive", False: "negative"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_uri", help="e.g. models:/imdb-sentiment@champion, models:/m-..., runs:/<id>/model")
    parser.add_argument("input", type=Path, help="a CSV/Parquet file with a text column, or a .txt file, one review a line")
    parser.add_argument("-o", "--output", type=Path, help="where to write the CSV (default: standard output)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    import mlflow

    frame = read_reviews(args.input, args.text_column)
    scored = score(mlflow.pyfunc.load_model(args.model_uri), frame, args.text_column, args.threshold)
    scored.to_csv(args.output if args.output else sys.stdout, index=False)


if __name__ == "__main__":
    main()
