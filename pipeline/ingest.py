"""Stage 1, ingest: labelled reviews from a source into one table.

In: an IngestConfig naming the Large Movie Review Dataset (a local .tar.gz or extracted folder in its
canonical layout, downloaded only when missing), `keras.datasets.imdb`, or a user's CSV/Parquet file.
Out: Reviews, a table with columns text, label (0/1), rating (1-10, or -1 where unknown) and split
(train/test), in a canonical order, with a sha256 content digest of exactly those rows.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import IngestConfig

# aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, anywhere below the archive's or folder's root
MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
COLUMNS = ["text", "label", "rating", "split"]
SPLITS = ("train", "test")


@dataclass
class Reviews:
    frame: pd.DataFrame  # columns text, label, rating, split
    digest: str  # sha256 over (split, label, rating, text) of every row, in order
    source: str  # where the rows came from (a path, a URL or keras.datasets.imdb)

    def counts(self) -> dict[str, int]:
        return {split: int((self.frame["split"] == split).sum()) for split in SPLITS}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(frame: pd.DataFrame) -> str:
    """sha256 over (split, label, rating, text) of every row, in order."""
    digest = hashlib.sha256()
    for split, label, rating, text in frame[["split", "label", "rating", "text"]].itertuples(index=False):
        digest.update(f"{split}\t{label}\t{rating}\t{len(text)}\n".encode())
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def _finish(rows: list[tuple], source: str) -> Reviews:
    # object columns: inferring pandas' Arrow string type for 50,000 reviews would cost a third of a second
    frame = pd.DataFrame(rows, columns=["split", "label", "id", "rating", "text"], dtype=object)
    frame = frame.astype({"label": "int8", "id": "int64", "rating": "int8"})
    frame = frame.sort_values(["split", "label", "id"], kind="stable", ignore_index=True)[COLUMNS]
    for split in SPLITS:
        labels = sorted(frame.loc[frame["split"] == split, "label"].unique().tolist())
        if len(labels) < 2:
            raise ValueError(f"{source}: the {split} split needs positive and negative reviews; found labels {labels}")
    return Reviews(frame=frame, digest=content_digest(frame), source=source)


def _review(match: re.Match, raw: bytes, name: str) -> tuple:
    """One row (split, label, id, rating, text) from a member's name and bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{name}: not valid UTF-8 ({error})") from None
    if not text.strip():
        raise ValueError(f"{name}: the review is empty")
    split, polarity, review_id, rating = match.groups()
    return split, int(polarity == "pos"), int(review_id), int(rating), text


def read_archive(path: Path) -> Reviews:
    """Reviews from an aclImdb .tar.gz, read in one pass; train/unsup and every other member are skipped."""
    rows = []
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                match = MEMBER.search(member.name)
                if match and member.isfile():
                    rows.append(_review(match, archive.extractfile(member).read(), member.name))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: not a readable .tar.gz archive ({error}); delete it and download it again") from None
    return _finish(_some(rows, path), str(path))


def _some(rows: list[tuple], path: Path) -> list[tuple]:
    if not rows:
        raise ValueError(f"{path}: no aclImdb/{{train,test}}/{{pos,neg}}/<id>_<rating>.txt files inside")
    return rows


def read_folder(path: Path) -> Reviews:
    """Reviews from an extracted aclImdb folder (the folder itself or the one that contains it)."""
    root = path if (path / "train").is_dir() or (path / "test").is_dir() else path / "aclImdb"
    rows = []
    for file in sorted(root.glob("*/*/*.txt")):
        match = MEMBER.search("aclImdb/" + file.relative_to(root).as_posix())
        if match:
            rows.append(_review(match, file.read_bytes(), str(file)))
    return _finish(_some(rows, path), str(path))


def download(url: str, target: Path, sha256: str | None) -> Path:
    """Fetch `url` to `target` with a progress bar on stderr; verify the checksum before keeping it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                shown = f"{done / total:6.1%}" if total else f"{done >> 20} MB"
                print(f"\rdownloading {url}: {shown}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if sha256 and sha256_file(Path(partial)) != sha256:
            raise ValueError(f"{url}: the download's sha256 does not match {sha256}; nothing was kept")
        shutil.move(partial, target)
        return target
    except (urllib.error.URLError, OSError) as error:
        raise FileNotFoundError(
            f"No local copy at {target}, and downloading {url} failed ({error}). "
            f"Put the archive at {target}, or point ingest.path (or the IMDB_ARCHIVE environment "
            "variable) at a local copy of aclImdb_v1.tar.gz or of its extracted folder.") from None
    finally:
        Path(partial).unlink(missing_ok=True)


def locate(cfg: IngestConfig) -> Path:
    """The local archive or folder, downloaded first if it is missing and downloads are allowed."""
    path = Path(cfg.path).expanduser()
    if path.exists():
        return path
    if cfg.source != "archive" or not cfg.download:
        raise FileNotFoundError(f"ingest.path={cfg.path!r} does not exist; point it at your "
                                f"{'archive' if cfg.source == 'archive' else 'table'} file")
    return download(cfg.url, path, cfg.sha256)


def read_table(cfg: IngestConfig, seed: int) -> Reviews:
    """Reviews from a CSV or Parquet file with a text column, 0/1 labels and an optional split column."""
    path = locate(cfg)
    frame = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)} "
                         "(set ingest.text_column / ingest.label_column)")
    labels = pd.to_numeric(frame[cfg.label_column], errors="coerce")
    if not labels.isin([0, 1]).all():
        bad = frame.loc[~labels.isin([0, 1]), cfg.label_column].unique()[:5].tolist()
        raise ValueError(f"{path}: column {cfg.label_column!r} must hold 0 or 1 only; found {bad}")
    texts = frame[cfg.text_column]
    if texts.isna().any() or not texts.map(lambda t: isinstance(t, str) and bool(t.strip())).all():
        raise ValueError(f"{path}: column {cfg.text_column!r} has empty or non-text values")
    if cfg.split_column and cfg.split_column in frame.columns:
        split = frame[cfg.split_column].astype(str).str.lower()
        if not split.isin(SPLITS).all():
            raise ValueError(f"{path}: column {cfg.split_column!r} must hold train or test; "
                             f"found {sorted(set(split) - set(SPLITS))[:5]}")
    else:
        order = np.random.default_rng(seed).permutation(len(frame))
        split = pd.Series("train", index=frame.index)
        split.iloc[order[: int(round(cfg.test_fraction * len(frame)))]] = "test"
    rows = [(s, int(lab), i, -1, t) for i, (s, lab, t) in enumerate(zip(split, labels, texts))]
    return _finish(rows, str(path))


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
    return _finish(rows, "keras.datasets.imdb")


def ingest(cfg: IngestConfig, seed: int = 42) -> Reviews:
    """Read the configured source into a Reviews table."""
    if cfg.source == "keras":
        return read_keras(cfg)
    if cfg.source == "table":
        return read_table(cfg, seed)
    path = locate(cfg)
    return read_folder(path) if path.is_dir() else read_archive(path)


def input_digest(cfg: IngestConfig) -> str:
    """What identifies the input before reading it, for the stage cache: the file's own sha256
    (an archive or table), the names, sizes and times of a folder's files, or the keras source."""
    if cfg.source == "keras":
        return f"keras.datasets.imdb:{cfg.num_words}"
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
