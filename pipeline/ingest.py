"""Stage 1, ingest: labelled reviews from a source into one table.

In: an IngestConfig naming the Large Movie Review Dataset (a local .tar.gz or extracted folder in its
canonical layout, downloaded only when missing), `keras.datasets.imdb`, or a user's CSV/Parquet file.
Out: Reviews, a table with columns text, label (0/1), rating (1-10, or -1 where unknown) and split
(train/test), in a canonical order, with a sha256 content digest of exactly those rows. A user's table is read
in chunks and its texts stay in its file: its Reviews have the row numbers there (column `row`) for `text`.
SOURCES, at the end, is the one table of the sources (ingest.source): what the rest of the pipeline asks of one.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pipeline.config import IngestConfig
from pipeline.console import Progress
from pipeline.download import download, downloaded, progress, record, sha256_file
from pipeline.tables import SUFFIXES as TABLES
from pipeline.tables import Hashing, TableTexts, counting, hashed, labels_of, not_texts, read_chunks, text_column


# aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, anywhere below the archive's or folder's root
MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
COLUMNS = ["text", "label", "rating", "split"]
SPLITS = ("train", "test")


@dataclass
class Reviews:
    frame: pd.DataFrame  # columns text, label, rating, split
    digest: str  # sha256 over (split, label, rating, text) of every row, in order
    source: str  # where the rows came from (a path, a URL or keras.datasets.imdb)
    skipped: list = field(default_factory=list)  # [where, why] of each row or file left out (skip_bad_rows)
    labels: dict = field(default_factory=dict)  # {"positive": value, "negative": value} when positive_label mapped them
    table: TableTexts | None = None  # a table's texts, in its file: the frame has their row numbers (`row`), not them

    def counts(self) -> dict[str, int]:
        return {split: int((self.frame["split"] == split).sum()) for split in SPLITS}

    def texts(self) -> pd.Series:
        """Each review's text, in the frame's order: its column, or read from the table's file."""
        return self.frame["text"] if self.table is None else self.table.at(self.frame["row"].to_numpy())

    def meta(self) -> dict:
        """Everything but the table, as JSON (kept beside the table in the stage cache)."""
        return {"source": self.source, "digest": self.digest, "counts": self.counts(), "skipped": self.skipped,
                "labels": self.labels}


def content_digest(frame: pd.DataFrame) -> str:
    """sha256 over (split, label, rating, text) of every row, in order."""
    digest = hashlib.sha256()
    for split, label, rating, text in frame[["split", "label", "rating", "text"]].itertuples(index=False):
        digest.update(f"{split}\t{label}\t{rating}\t{len(text)}\n".encode())
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def _finish(rows: list[tuple], source: str, skipped: list, labels: dict | None = None, layout: bool = False) -> Reviews:
    # object columns: inferring pandas' Arrow string type for 50,000 reviews would cost a third of a second
    frame = pd.DataFrame(rows, columns=["split", "label", "id", "rating", "text"], dtype=object)
    frame = frame.astype({"label": "int8", "id": "int64", "rating": "int8"})
    frame = frame.sort_values(["split", "label", "id"], kind="stable", ignore_index=True)[COLUMNS]
    return Reviews(_complete(frame, source, layout), content_digest(frame), source, skipped, labels or {})


def _complete(frame: pd.DataFrame, source: str, layout: bool = False) -> pd.DataFrame:
    """`frame`, unless a split lacks positive or negative reviews."""
    missing = [(split, label) for split in SPLITS for label in (1, 0)
               if not ((frame["split"] == split) & (frame["label"] == label)).any()]
    if missing and layout:  # an archive or folder: the folder that should hold them
        folders = " or ".join(f"aclImdb/{split}/{'pos' if label else 'neg'}/" for split, label in missing)
        raise ValueError(f"no {folders} reviews in {source}; it needs train/ and test/, each with pos/ and neg/ "
                         "(a complete aclImdb_v1.tar.gz has 12,500 reviews in each)")
    if missing:
        raise ValueError(f"{source}: the {missing[0][0]} split needs positive and negative reviews; it has no "
                         f"{'positive' if missing[0][1] else 'negative'} rows")
    return frame


def _bad(source: str, skipped: list, skip: bool, what: str) -> list:
    """Stop, naming the first five bad rows or files and the count, unless skip_bad_rows leaves them out."""
    if skipped and not skip:
        named = ", ".join(f"{where} ({why})" for where, why in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise ValueError(f"{source}: {len(skipped)} {what}: {named}; fix them, or leave them out "
                         "with ingest.skip_bad_rows=true")
    return skipped


def _reviews(found, source: str, skip: bool) -> Reviews:
    """Rows from (member name, name match, raw bytes) triples: a review must be non-empty UTF-8."""
    rows, skipped = [], []
    for name, match, raw in found:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            skipped.append([name, f"not valid UTF-8 ({error})"])
            continue
        if not text.strip():
            skipped.append([name, "the review is empty"])
            continue
        split, polarity, review_id, rating = match.groups()
        rows.append((split, int(polarity == "pos"), int(review_id), int(rating), text))
    if not rows and not skipped:
        raise ValueError(f"{source}: no aclImdb/{{train,test}}/{{pos,neg}}/<id>_<rating>.txt files inside")
    return _finish(rows, source, _bad(source, skipped, skip, "review files unreadable or empty"), layout=True)


def read_archive(path: Path, skip: bool = False) -> Reviews:
    """Reviews from an aclImdb .tar.gz, read in one pass; train/unsup and every other member are skipped."""
    def members(raw):
        with tarfile.open(fileobj=raw, mode="r|*") as archive:
            for member in archive:
                match = MEMBER.search(member.name)
                if match and member.isfile():
                    yield member.name, match, archive.extractfile(member).read()
                    progress(f"reading {path.name}", min(raw.tell(), size - 1), size)  # the end: below

    if path.suffix.lower() in TABLES:
        raise ValueError(f"{path} is a table, not an archive of reviews: read it with "
                         f"ingest=table ingest.path={path} (ingest.text_column, ingest.label_column name its columns)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as raw:
            found = list(members(raw))
        progress(f"reading {path.name}", size, size)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(unreadable(path, error)) from None
    return _reviews(found, str(path), skip)


def unreadable(path: Path, error: Exception) -> str:
    """What is wrong with an archive that does not read, and the fix: for the pipeline's own download, to
    fetch it again; for a user's file, what the file is and what to give instead."""
    if downloaded(path):
        if sha256_file(path) != record(path).read_text().split()[0]:
            return (f"{path}: not a readable .tar.gz archive ({error}); it has changed since the pipeline downloaded "
                    "it: delete it and run again to download it again")
        return (f"{path}: not a readable .tar.gz archive ({error}), exactly as the pipeline downloaded it: ingest.url "
                "does not serve the archive; set it to the aclImdb_v1.tar.gz URL (and ingest.sha256 to check it)")
    with open(path, "rb") as raw:
        head = raw.read(4)
    what = ("a .zip archive: extract it and set ingest.path to the extracted folder" if head.startswith(b"PK")
            else "cut short (an incomplete copy?)" if isinstance(error, EOFError) or re.search(r"\bend", str(error))
            else f"not a .tar.gz archive ({error})")
    return (f"{path}: not a readable .tar.gz archive: it is {what}; set ingest.path (or IMDB_ARCHIVE) to a complete "
            "aclImdb_v1.tar.gz or its extracted folder (for your own .csv, .tsv, .jsonl or .parquet: "
            "ingest=table ingest.path=<file>)")


def read_folder(path: Path, skip: bool = False) -> Reviews:
    """Reviews from an extracted aclImdb folder (the folder itself or the one that contains it)."""
    root = path if (path / "train").is_dir() or (path / "test").is_dir() else path / "aclImdb"
    files = ((file, MEMBER.search("aclImdb/" + file.relative_to(root).as_posix())) for file in sorted(root.glob("*/*/*.txt")))
    return _reviews([(str(file), match, file.read_bytes()) for file, match in files if match], str(path), skip)


def locate(cfg: IngestConfig) -> Path:
    """The local archive or folder, downloaded first if it is missing and downloads are allowed."""
    path = Path(cfg.path).expanduser()
    if path.exists():
        return path
    if not SOURCES[cfg.source].downloads or not cfg.download:
        raise FileNotFoundError(f"ingest.path={cfg.path!r} does not exist; point it at your {cfg.source} file")
    return download(cfg.url, path, cfg.sha256)


def read_table(cfg: IngestConfig, seed: int) -> Reviews:
    """Reviews from a table (a text column, a label column and an optional split column), read chunk by chunk:
    the texts stay in the file (Reviews.table), each row keeping its number there (column `row`)."""
    with Hashing() as texts:  # (the content digest's texts, in the file's order, hashed while the next chunk is read)
        return _read_table(cfg, seed, locate(cfg), texts)


def _read_table(cfg: IngestConfig, seed: int, path: Path, texts: Hashing) -> Reviews:
    found: dict[str, list] = {"labels": [], "split": [], "lines": [], "unusable": [], "lengths": []}
    broken, why, count, shown = [], {}, 0, Progress(f"reading {path.name}")
    for number, (frame, share) in enumerate(read_chunks(path, broken)):
        if number == 0:
            missing = [c for c in (cfg.text_column, cfg.label_column) if c not in frame.columns]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)} "
                                 "(set ingest.text_column / ingest.label_column)")
            by_column, lines = bool(cfg.split_column and cfg.split_column in frame.columns), frame.index.name == "line"
        values = text_column(frame, cfg.text_column, path, "set ingest.text_column to the column of reviews")
        reasons = not_texts(values)
        why.update((count + row, reason) for row, reason in reasons.items())
        unusable = np.zeros(len(values), dtype=bool)
        unusable[list(reasons)] = True
        found["lengths"].append(hashed(texts, values[~unusable]))
        found["unusable"].append(unusable)
        found["labels"].append(frame[cfg.label_column])
        found["split"].append(frame[cfg.split_column] if by_column else None)
        found["lines"].append(frame.index.to_numpy() if lines else None)
        count += len(values)
        shown.update(count, share)
    shown.close()
    labels, mapping = labels_of(pd.concat(found["labels"], ignore_index=True), cfg.positive_label,
                                f"{path}: column {cfg.label_column!r}")
    unusable = np.concatenate(found["unusable"]) | labels.isna().to_numpy()
    numbers = np.concatenate(found["lines"]) if lines else None
    bad = [[f"line {numbers[row]}" if lines else str(row + 1), why.get(row, "no label")]
           for row in np.flatnonzero(unusable)]
    bad = sorted(broken + bad, key=lambda row: int(row[0].split()[-1]))  # (in the file's order)
    _bad(str(path), bad, cfg.skip_bad_rows, "lines that are not JSON objects, or have an empty text or no label"
         if lines else f"rows with an empty text or no label, {counting(path)}")
    if by_column:
        split = pd.concat(found["split"], ignore_index=True).astype(str).str.lower()
        if not split.isin(SPLITS).all():
            raise ValueError(f"{path}: column {cfg.split_column!r} must hold train or test; "
                             f"found {sorted(set(split) - set(SPLITS))[:5]}")
        split = split.to_numpy(dtype=object)
    else:
        order = np.random.default_rng(seed).permutation(count)
        split = np.full(count, "train", dtype=object)
        split[order[: int(round(cfg.test_fraction * count))]] = "test"
    good = np.flatnonzero(~unusable)
    lengths = np.zeros(count, dtype=np.int64)
    lengths[np.flatnonzero(~np.concatenate(found["unusable"]))] = np.concatenate(found["lengths"])
    frame = pd.DataFrame({"row": good, "label": labels.to_numpy()[good].astype("int8"), "rating": np.int8(-1),
                          "split": split[good]})
    frame = _complete(frame.sort_values(["split", "label", "row"], kind="stable", ignore_index=True), str(path))
    # the digest: each row's split, label, rating and text length in the canonical order, then the texts
    rows = np.rec.fromarrays([frame["split"].to_numpy().astype("S5"), frame["label"].to_numpy(),
                              frame["rating"].to_numpy(), lengths[frame["row"].to_numpy()]])
    digest = hashlib.sha256(rows.tobytes() + texts.digest()).hexdigest()
    return Reviews(frame, digest, str(path), bad, mapping, TableTexts(str(path), cfg.text_column))


def read_keras(cfg: IngestConfig) -> Reviews:
    """The tutorial's own copy: keras.datasets.imdb, pre-tokenized, decoded back to words."""
    from keras.datasets import imdb

    (x_train, y_train), (x_test, y_test) = imdb.load_data(num_words=cfg.num_words)
    # load_data shifts word indices by 3: 0 padding, 1 start, 2 unknown
    words = {index + 3: word for word, index in imdb.get_word_index().items()}
    rows = []
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (ids, label) in enumerate(zip(xs, ys)):
            text = " ".join(words.get(int(t), "[UNK]") for t in ids if t >= 3)
            rows.append((split, int(label), i, -1, text))
    return _finish(rows, "keras.datasets.imdb", [])


def read_aclimdb(cfg: IngestConfig, seed: int = 42) -> Reviews:
    """Reviews from the aclImdb archive or its extracted folder (downloaded first if missing and allowed)."""
    path = locate(cfg)
    return (read_folder if path.is_dir() else read_archive)(path, cfg.skip_bad_rows)


def ingest(cfg: IngestConfig, seed: int = 42) -> Reviews:
    """Read the configured source into a Reviews table."""
    return SOURCES[cfg.source].read(cfg, seed)


def file_digest(cfg: IngestConfig) -> str:
    """The file's own sha256 (an archive or table), or the names, sizes and times of a folder's files."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        return ""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.txt")):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check(cfg: IngestConfig) -> None:
    """ingest.source names a source of SOURCES, and ingest.path is set where that source reads one (ValueError
    naming the setting; asked before any work by a run, train.check, and by a sweep for each job, pipeline.sweep)."""
    if cfg.source not in SOURCES:
        raise ValueError(f"ingest.source={cfg.source!r} is not allowed: one of {', '.join(SOURCES)}")
    if SOURCES[cfg.source].path and not cfg.path:
        raise ValueError(f"ingest.path={cfg.path!r} is not allowed: set the archive or table location (or the "
                         "IMDB_ARCHIVE environment variable)")


def input_digest(cfg: IngestConfig) -> str:
    """What identifies the input before reading it, for the stage cache (the source's `digest`)."""
    return SOURCES[cfg.source].digest(cfg)


@dataclass(frozen=True)
class Source:
    """An ingest source: its reader and what the rest of the pipeline asks of it."""
    read: Callable[..., Reviews]  # (IngestConfig, seed) -> Reviews
    digest: Callable[..., str]  # (IngestConfig) -> what identifies its input before reading it (the stage cache)
    path: bool  # reads ingest.path, which must then be set (config.py)
    local: bool  # ingest.path is a file or folder on this machine: checked before a run (train.py), and every
    #              worker of a sweep must read it there (sweep.py); the stage cache keys it by its content
    downloads: bool  # a missing ingest.path is fetched from ingest.url unless ingest.download=false
    seeded: bool  # its rows depend on the run's seed (a table's test rows are drawn): part of the cache key


SOURCES = {  # ingest.source -> Source; a new format is a reader and a line here
    "archive": Source(read_aclimdb, file_digest, path=True, local=True, downloads=True, seeded=False),
    "keras": Source(lambda cfg, seed=42: read_keras(cfg), lambda cfg: f"keras.datasets.imdb:{cfg.num_words}",
                    path=False, local=False, downloads=False, seeded=False),
    "table": Source(read_table, file_digest, path=True, local=True, downloads=False, seeded=True),
}
