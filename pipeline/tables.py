"""A user's table of reviews read from its file, for ingest=table and for batch scoring (pipeline/score.py).

In: a .csv, .tsv, .jsonl (.ndjson) or .parquet (.pq) file. Out: a pandas DataFrame, and for every way the file
can be wrong one line that names the file (and its line, row or column) and the fix. A .csv or .tsv file is read
with the delimiter its header uses (a tab-separated file named .csv just works).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq")
DELIMITERS = (",", "\t", ";")  # a header's most frequent one is the file's; a header of one column keeps the suffix's


def read_frame(path: Path, bad: list | None = None) -> pd.DataFrame:
    """The table in `path`, by its suffix. A JSON line that is not an object stops the read, naming its line;
    given `bad`, a list, it is left out and added to it as [line, why] instead. The rows of a JSON lines file
    are indexed by their line numbers (index name "line"), those of other files from 0."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".ndjson"):
            frame = _json_lines(path, bad)
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep=delimiter(path, "\t" if suffix == ".tsv" else ","))
        else:
            archive = f"; the aclImdb archive or folder is read with ingest=archive ingest.path={path}" \
                if path.is_dir() or path.name.lower().endswith((".tar.gz", ".tgz", ".tar")) else ""
            raise ValueError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv, .jsonl or .parquet{archive}")
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except pd.errors.ParserError as error:
        raise ValueError(f"{path}: not a readable table ({' '.join(str(error).split())}); a field that holds the "
                         "delimiter must be in double quotes") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    if frame.shape[1] == 0:
        raise ValueError(f"{path} is empty: a table needs its columns named (a CSV's header line, e.g. text,label) "
                         "and a row per review")
    return frame


def delimiter(path: Path, default: str) -> str:
    """The delimiter the file's header line uses most: comma, tab or semicolon."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        header = handle.readline()
    counts = {mark: header.count(mark) for mark in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[default] else default


def _json_lines(path: Path, bad: list | None) -> pd.DataFrame:
    records, lines = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.strip())
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}")
            except ValueError as error:
                what = f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else error
                why = f"not a JSON object ({what})"
                if bad is None:
                    raise ValueError(f"{path} line {number}: {why}; each line must be one object, e.g. "
                                     '{"text": "...", "label": 1}: fix or remove the line') from None
                bad.append([f"line {number}", why])
                continue
            records.append(record)
            lines.append(number)
    return pd.DataFrame.from_records(records, index=pd.Index(lines, name="line"))


def row_names(frame: pd.DataFrame) -> list[str]:
    """How a message names each row: "line <n>" in a JSON lines file, else its number counting from 1 after
    the header (or from 1 in a Parquet file)."""
    if frame.index.name == "line":
        return [f"line {number}" for number in frame.index]
    return [str(number) for number in range(1, len(frame) + 1)]


def not_text(value) -> str | None:
    """Why a cell is not a review (empty, or not a string), or None."""
    if isinstance(value, str):
        return None if value.strip() else "empty text"
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "empty text"
    return f"{type(value).__name__} {value!r:.30}, not text"


def text_column(frame: pd.DataFrame, column: str, path: Path, fix: str) -> pd.Series:
    """The column of reviews; a missing column, or one that holds numbers, is refused with `fix` (what names it)."""
    columns = list(frame.columns)
    if column not in columns:
        raise ValueError(f"{path}: no column {column!r} (its columns: {columns[:20]}); {fix}")
    values = frame[column]
    if values.notna().any() and (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
        raise ValueError(f"{path}: column {column!r} holds numbers ({values.dtype}), not text; {fix} "
                         f"(its columns: {columns[:20]})")
    return values
