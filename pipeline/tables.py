"""A user's table of reviews read from its file, for ingest=table and for batch scoring (pipeline/score.py).

In: a .csv, .tsv, .jsonl (.ndjson) or .parquet (.pq) file. Out: a pandas DataFrame (read_frame), or the same rows
as frames of CHUNK_ROWS rows at a time (read_chunks: what ingest=table reads, so that a table of millions of
reviews is never held whole), and for every way the file can be wrong one line that names the file (and its
line, row or column) and the fix. A .csv or .tsv file is read
with the delimiter its header uses (a tab-separated file named .csv just works).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

PARQUET, JSON_LINES, DELIMITED = (".parquet", ".pq"), (".jsonl", ".ndjson"), (".csv", ".tsv")
SUFFIXES = DELIMITED + JSON_LINES + PARQUET
CHUNK_ROWS = 10_000  # rows read at once from a big table: about 13 MB of IMDB-sized reviews
DELIMITERS = (",", "\t", ";")  # a header's most frequent one is the file's; a header of one column keeps the suffix's


def read_frame(path: Path, bad: list | None = None) -> pd.DataFrame:
    """The table in `path`, by its suffix. A JSON line that is not an object stops the read, naming its line;
    given `bad`, a list, it is left out and added to it as [line, why] instead. The rows of a JSON lines file
    are indexed by their line numbers (index name "line"), those of other files from 0."""
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET:
            frame = pd.read_parquet(path)
        elif suffix in JSON_LINES:
            frame = next(_json_lines(path, bad))[0]
        elif suffix in DELIMITED:
            frame = pd.read_csv(path, sep=delimiter(path, "\t" if suffix == ".tsv" else ","))
        else:
            raise _unknown(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise _unreadable(path, error) from None
    if frame.shape[1] == 0:
        raise _unreadable(path, pd.errors.EmptyDataError())
    return frame


def read_chunks(path: Path, bad: list | None = None, columns: list[str] | None = None,
                rows: int | None = None) -> Iterator[tuple[pd.DataFrame, float]]:
    """The rows read_frame reads, as frames of at most `rows` rows (CHUNK_ROWS), in order, each with the share
    of the file read so far: what a big table is read as, its memory bounded by the chunk. `columns`: only
    these (all when None). The first frame, empty for a table of no rows, names the columns; every way the
    file can be wrong stops the read as read_frame's does."""
    suffix, rows = path.suffix.lower(), rows or CHUNK_ROWS
    try:
        if suffix in PARQUET:
            import pyarrow.parquet as pq

            # pre_buffer (pyarrow's default) would keep what is read of the file in memory to the end: 0.8 GB
            with pq.ParquetFile(path, pre_buffer=False) as file:  # for a million reviews, and slower here
                names, total, done = file.schema_arrow.names, max(file.metadata.num_rows, 1), 0
                if not names:
                    raise pd.errors.EmptyDataError()
                # (pandas' metadata would make its string columns Python objects first: twice the time)
                yield file.schema_arrow.empty_table().select(columns or names).to_pandas(ignore_metadata=True), 0.0
                for batch in file.iter_batches(batch_size=rows, columns=columns):
                    done += batch.num_rows
                    yield batch.to_pandas(ignore_metadata=True), done / total
        elif suffix in JSON_LINES:
            yield from _json_lines(path, bad, rows)
        elif suffix in DELIMITED:
            sep, size = delimiter(path, "\t" if suffix == ".tsv" else ","), max(path.stat().st_size, 1)
            with open(path, "rb") as handle, pd.read_csv(handle, sep=sep, chunksize=rows, usecols=columns,
                                                         encoding="utf-8") as reader:
                for frame in reader:
                    yield frame, min(handle.tell() / size, 1.0)
        else:
            raise _unknown(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise _unreadable(path, error) from None


def _unknown(path: Path) -> ValueError:
    archive = f"; the aclImdb archive or folder is read with ingest=archive ingest.path={path}" \
        if path.is_dir() or path.name.lower().endswith((".tar.gz", ".tgz", ".tar")) else ""
    return ValueError(f"{path}: unknown table format {path.suffix.lower()!r}; use .csv, .tsv, .jsonl or "
                      f".parquet{archive}")


def _unreadable(path: Path, error: Exception) -> ValueError:
    """The one line for a table that does not read: empty, not parsed, not UTF-8."""
    if isinstance(error, pd.errors.EmptyDataError):
        return ValueError(f"{path} is empty: a table needs its columns named (a CSV's header line, e.g. text,label) "
                          "and a row per review")
    if isinstance(error, UnicodeDecodeError):
        return ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8")
    return ValueError(f"{path}: not a readable table ({' '.join(str(error).split())}); a field that holds the "
                      "delimiter must be in double quotes")


@dataclass(frozen=True)
class TableTexts:
    """Where a table's reviews are read from when they are not held in memory: its file and text column. Its
    rows are numbered from 0 as read_chunks yields them (a JSON line that is not an object is no row)."""
    path: str
    column: str

    def at(self, rows) -> pd.Series:
        """The texts of the rows numbered `rows` (a sequence of numbers), in that order."""
        numbers = np.asarray(rows, dtype=np.int64)
        texts = np.empty(int(numbers.max(initial=-1)) + 1, dtype=object)
        for start, chunk in self.chunks(CHUNK_ROWS):
            texts[start:start + len(chunk)] = chunk[:max(len(texts) - start, 0)]
        return pd.Series(texts[numbers], dtype=object, name="text")

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, list]]:
        """(number of the chunk's first row, its texts), chunk by chunk."""
        for start, texts in self.columns(rows):
            yield start, texts.tolist()

    def columns(self, rows: int | None = None) -> Iterator[tuple[int, pd.Series]]:
        """(number of the chunk's first row, its texts as the column read), chunk by chunk."""
        start = 0
        for frame, _ in read_chunks(Path(self.path), [], [self.column], rows):
            texts = frame[self.column] if self.column in frame.columns else pd.Series([None] * len(frame), dtype=object)
            yield start, texts
            start += len(texts)


def delimiter(path: Path, default: str) -> str:
    """The delimiter the file's header line uses most: comma, tab or semicolon."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        header = handle.readline()
    counts = {mark: header.count(mark) for mark in DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[default] else default


def _json_lines(path: Path, bad: list | None, rows: int | None = None) -> Iterator[tuple[pd.DataFrame, float]]:
    """The objects of a JSON lines file as frames of at most `rows` each (all in one when None), indexed by
    their line numbers, each with the share of the file read; the first is empty for a file of no objects."""
    size, read = max(path.stat().st_size, 1), [0]

    def counted(lines):
        for item in lines:
            read[0] += len(item[1])
            if item[1].strip():
                yield item

    with open(path, encoding="utf-8-sig") as handle:  # (a byte-order mark at its start is no part of line 1)
        numbered, first = counted(enumerate(handle, 1)), True
        while (batch := list(islice(numbered, rows))) or first:
            first, records, lines = False, [], []
            for number, line in batch:
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
            yield pd.DataFrame.from_records(records, index=pd.Index(lines, name="line")), min(read[0] / size, 1.0)


def counting(path: Path) -> str:
    """How a message's row numbers count: from 1 after a delimited file's header line (a Parquet file has none)."""
    return "counting from 1" if path.suffix.lower() in PARQUET else "counting from 1 after the header"


def row_names(frame: pd.DataFrame) -> list[str]:
    """How a message names each row: "line <n>" in a JSON lines file, else its number counting from 1 after
    the header (or from 1 in a Parquet file)."""
    if frame.index.name == "line":
        return [f"line {number}" for number in frame.index]
    return [str(number) for number in range(1, len(frame) + 1)]


def labels_of(column: pd.Series, positive: str | None, where: str) -> tuple[pd.Series, dict]:
    """0/1 labels (NaN where missing) and the mapping used: 0/1 as written, or `positive` -> 1 and the
    column's other value -> 0."""
    if positive is None:
        labels = pd.to_numeric(column, errors="coerce")
        wrong = column.notna() & ~labels.isin([0, 1])
        if wrong.any():
            raise ValueError(f"{where} must hold 0 or 1 only; found {column[wrong].unique()[:5].tolist()}. If it "
                             "holds two other values, name the positive one: ingest.positive_label=<value>")
        return labels, {}
    written = column.map(as_written)
    values = sorted(written.dropna().unique().tolist())
    if len(values) > 2 or positive not in values:
        raise ValueError(f"{where} holds {len(values)} distinct values {values[:10]}; ingest.positive_label="
                         f"{positive!r} needs two, one of them {positive!r}")
    negative = next((value for value in values if value != positive), None)
    return written.eq(positive).astype(float).where(written.notna()), {"positive": positive, "negative": negative}


def as_written(value):
    """A label cell as its file writes it: a whole number read as a float (1.0 in a column with blank cells) as 1."""
    if pd.isna(value):
        return value
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def not_text(value) -> str | None:
    """Why a cell is not a review (empty, or not a string), or None."""
    if isinstance(value, str):
        return None if value.strip() else "empty text"
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "empty text"
    return f"{type(value).__name__} {value!r:.30}, not text"


class Hashing:
    """A sha256 fed in a thread of its own, while the caller reads on (hashlib lets go of the interpreter for
    long inputs); at most one input waits. A context: the thread ends with it."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.sha256, self.thread, self.pending = hashlib.sha256(), ThreadPoolExecutor(1, "hashing"), None

    def update(self, data) -> None:
        self.digest()
        self.pending = self.thread.submit(self.sha256.update, data)

    def digest(self) -> bytes:
        if self.pending is not None:
            self.pending, pending = None, self.pending
            pending.result()
        return self.sha256.digest()

    def __enter__(self) -> "Hashing":
        return self

    def __exit__(self, *exc) -> None:
        self.thread.shutdown(wait=True)


def hashed(digest, texts: pd.Series) -> np.ndarray:
    """Feed the UTF-8 of `texts` (strings), one after another, to `digest`; return their lengths in bytes. A
    column of Arrow strings is hashed where it lies, with no copy."""
    if isinstance(texts.array, pd.arrays.ArrowStringArray):
        import pyarrow as pa

        column = pa.array(texts.array)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        width = np.int64 if pa.types.is_large_string(column.type) else np.int32
        ends = np.frombuffer(column.buffers()[1], dtype=width)[column.offset:column.offset + len(column) + 1]
        if len(column):
            digest.update(memoryview(column.buffers()[2])[ends[0]:ends[-1]])
        return np.diff(ends).astype(np.int64)
    encoded = [text.encode("utf-8") for text in texts.tolist()]
    digest.update(b"".join(encoded))
    return np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))


def not_texts(values: pd.Series) -> dict[int, str]:
    """{position: why} of the cells of `values` that are no review (tables.not_text), found column-wise in a
    column of strings."""
    if pd.api.types.is_string_dtype(values) and not pd.api.types.is_object_dtype(values):
        empty = values.isna().to_numpy() | values.str.strip().eq("").to_numpy()
        return {int(row): "empty text" for row in np.flatnonzero(empty)}
    return {row: reason for row, value in enumerate(values.tolist()) if (reason := not_text(value))}


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
