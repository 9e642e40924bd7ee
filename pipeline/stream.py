"""The streamed path of ingest -> split -> vectorize, for an archive source larger than memory.

In: an IngestConfig naming an aclImdb .tar.gz or extracted folder, read in one sequential pass. Out:
StreamedReviews (every review's UTF-8 bytes back to back in one file, texts.bin, and tens of bytes of
metadata a review in numpy arrays, in ingest's canonical order and with its content digest), RowSplits
(split.py's split as row numbers) and build.Encoded, the same arrays build.vectorize makes, written
chunk by chunk into .npy files. Texts are never all in memory; the token ids (1 KB a review) are.
Only the archive source streams: keras.datasets.imdb and tables arrive as one object in memory anyway.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline import ingest, split, textmodel
from pipeline.build import Encoded
from pipeline.config import BuildConfig, IngestConfig, SplitConfig

BLOB = "texts.bin"
SPLIT_CODES = ("test", "train")  # int8 codes in the order of the names, which the canonical order sorts by
# Memory the in-memory path adds beyond its base, per byte of input. Measured (ru_maxrss of ingest, split
# and vectorize in memory): 9.5x the archive on the 1x corpus (26.5 MB, 50,000 reviews) and 8.4x on a 4x
# one (124 MB, as bench.scaled_archive writes it); 5.3 KB a review, 4.0x its 1.3 KB of UTF-8 text.
ARCHIVE_FACTOR = 10.0  # .tar.gz size times this; rounded up
FOLDER_FACTOR = 4.5  # an extracted folder's review files' total size times this; rounded up
META = {"offset": "q", "length": "q", "split": "b", "label": "b", "id": "q", "rating": "b"}  # array codes


# -- memory or stream --------------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes of memory available to a new allocation: MemAvailable from /proc/meminfo, else the
    machine's physical memory."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimated_need(path: Path) -> int:
    """Bytes the in-memory path would add for this input (see ARCHIVE_FACTOR and FOLDER_FACTOR)."""
    if path.is_dir():
        return int(FOLDER_FACTOR * sum(file.stat().st_size for file, _ in ingest.folder_files(path)))
    return int(ARCHIVE_FACTOR * path.stat().st_size)


def choose_mode(mode: str, need: int, available: int) -> tuple[str, str]:
    """(memory or stream, why): `auto` streams when the estimated need exceeds half the available memory."""
    if mode != "auto":
        return mode, f"ingest.mode={mode}"
    mb = 1 << 20
    if need > available / 2:
        return "stream", (f"ingest.mode=auto: holding the texts would take about {need // mb} MB, "
                          f"more than half of the {available // mb} MB available")
    return "memory", (f"ingest.mode=auto: holding the texts takes about {need // mb} MB, "
                      f"at most half of the {available // mb} MB available")


def resolve_mode(cfg: IngestConfig) -> tuple[str, str]:
    """The mode this run's ingest uses, and why."""
    if cfg.source != "archive":
        return "memory", f"ingest.source={cfg.source} is always read in memory"
    if cfg.mode != "auto":
        return choose_mode(cfg.mode, 0, 0)
    return choose_mode(cfg.mode, estimated_need(ingest.locate(cfg)), available_memory())


# -- ingest ------------------------------------------------------------------------------------------
@dataclass
class StreamedReviews:
    blob: Path  # texts.bin: every review's UTF-8 bytes, in the order they were read
    offset: np.ndarray  # int64, one per review in the canonical order (split, label, id), as ingest's rows
    length: np.ndarray  # int64, bytes
    split: np.ndarray  # int8, index into SPLIT_CODES
    label: np.ndarray  # int8, 0/1
    id: np.ndarray  # int64
    rating: np.ndarray  # int8
    digest: str  # ingest.content_digest of the same rows
    source: str
    blob_sha256: str = ""  # of texts.bin, computed while it was written

    def counts(self) -> dict[str, int]:
        return {name: int((self.split == SPLIT_CODES.index(name)).sum()) for name in ingest.SPLITS}

    def meta(self) -> dict:
        return {"digest": self.digest, "source": self.source, "counts": self.counts()}

    def product(self) -> dict:
        """What the stage cache keeps: the blob (already in the staging folder) and the arrays."""
        return {"texts": self.blob, **{name: getattr(self, name) for name in META}}

    @classmethod
    def from_product(cls, product: dict, meta: dict) -> StreamedReviews:
        return cls(blob=product["texts"], digest=meta["digest"], source=meta["source"],
                   **{name: product[name] for name in META})

    @contextmanager
    def reader(self) -> Iterator[Callable[[np.ndarray], list[str]]]:
        """A function from row numbers to those reviews' texts. Read with pread, not a memory map: the
        pages stay in the page cache, never in this process's resident memory."""
        handle = os.open(self.blob, os.O_RDONLY)
        try:
            def read(rows: np.ndarray) -> list[str]:
                return [os.pread(handle, size, start).decode("utf-8")
                        for start, size in zip(self.offset[rows].tolist(), self.length[rows].tolist())]
            yield read
        finally:
            os.close(handle)


def _members(path: Path) -> Iterator[tuple[str, tuple, bytes]]:
    """(name, MEMBER groups, bytes) of each review, in the order a sequential read finds them."""
    if path.is_dir():
        for file, name in ingest.folder_files(path):
            match = ingest.MEMBER.search(name)
            if match:
                yield str(file), match.groups(), file.read_bytes()
        return
    try:
        with tarfile.open(path, "r|*") as archive:  # a stream: one member in memory at a time
            for member in archive:
                match = ingest.MEMBER.search(member.name)
                if match and member.isfile():
                    yield member.name, match.groups(), archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ingest.archive_error(path, error) from None


def ingest_stream(cfg: IngestConfig, folder: Path) -> StreamedReviews:
    """Read the archive or folder once, appending each review to `folder`/texts.bin; the same rows,
    order, digest and errors as ingest.ingest, holding only the metadata in memory."""
    path = ingest.locate(cfg)
    columns = {name: array(code) for name, code in META.items()}
    blob, hashed, position = Path(folder) / BLOB, hashlib.sha256(), 0
    with open(blob, "wb") as out:
        for name, (split_name, polarity, review_id, rating), raw in _members(path):
            ingest.decode(raw, name)  # valid UTF-8 and not empty, or the same ValueError as in memory
            for column, value in (("offset", position), ("length", len(raw)),
                                  ("split", SPLIT_CODES.index(split_name)), ("label", polarity == "pos"),
                                  ("id", int(review_id)), ("rating", int(rating))):
                columns[column].append(value)
            out.write(raw)
            hashed.update(raw)
            position += len(raw)
    if not columns["offset"]:
        raise ingest.no_members(path)
    arrays = {name: np.frombuffer(values, dtype=np.int64 if META[name] == "q" else np.int8)
              for name, values in columns.items()}
    order = np.lexsort((arrays["id"], arrays["label"], arrays["split"]))  # stable, as ingest's sort
    arrays = {name: values[order] for name, values in arrays.items()}
    for code in (SPLIT_CODES.index(name) for name in ingest.SPLITS):
        ingest.check_classes(str(path), SPLIT_CODES[code],
                             np.unique(arrays["label"][arrays["split"] == code]).tolist())
    reviews = StreamedReviews(blob=blob, digest="", source=str(path), blob_sha256=hashed.hexdigest(), **arrays)
    reviews.digest = content_digest(reviews)
    return reviews


def content_digest(reviews: StreamedReviews) -> str:
    """ingest.content_digest of the rows, reading the texts from the blob in chunks."""
    digest = hashlib.sha256()
    with reviews.reader() as read:
        for start in range(0, len(reviews.offset), textmodel.ENCODE_CHUNK):
            rows = np.arange(start, min(start + textmodel.ENCODE_CHUNK, len(reviews.offset)))
            ingest.update_digest(digest, zip([SPLIT_CODES[code] for code in reviews.split[rows].tolist()],
                                             reviews.label[rows].tolist(), reviews.rating[rows].tolist(), read(rows)))
    return digest.hexdigest()


# -- split -------------------------------------------------------------------------------------------
@dataclass
class RowSplits:
    train: np.ndarray  # row numbers of StreamedReviews, in the order split.split puts those reviews
    validation: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_rows(reviews: StreamedReviews, cfg: SplitConfig, seed: int) -> RowSplits:
    """split.split as index arithmetic: the same seeded order of the training rows, the same hold-out."""
    train = np.flatnonzero(reviews.split == SPLIT_CODES.index("train"))
    test = np.flatnonzero(reviews.split == SPLIT_CODES.index("test"))
    order, size = split.holdout(len(train), cfg, seed)
    train = train[order]
    return RowSplits(train=train[size:], validation=train[:size], test=test)


# -- vectorize ---------------------------------------------------------------------------------------
def _chunks(reviews: StreamedReviews, rows: np.ndarray) -> Iterator[np.ndarray]:
    """Positions into `rows`, ENCODE_CHUNK at a time, in the order the texts lie in the blob."""
    by_offset = np.argsort(reviews.offset[rows], kind="stable")
    for start in range(0, len(rows), textmodel.ENCODE_CHUNK):
        yield by_offset[start:start + textmodel.ENCODE_CHUNK]


def vectorize_stream(reviews: StreamedReviews, rows: RowSplits, cfg: BuildConfig, folder: Path) -> Encoded:
    """build.vectorize in two passes over the blob, in the order its texts lie: count the training
    reviews' tokens, then encode every review and write its row of x_{train,validation,test}.npy in
    `folder` (with pwrite, not a memory map, so that written rows do not stay resident). Returns the
    arrays mapped read-only from those files: they are read into memory only where they are used."""
    with reviews.reader() as read:
        counts: Counter = Counter()
        for positions in _chunks(reviews, rows.train):
            textmodel.count_tokens(read(rows.train[positions]), counts)
        vocabulary = textmodel.rank(counts, cfg.vocabulary_size)
        del counts
        index = textmodel.token_index(vocabulary)
        arrays = {}
        for name in ("train", "validation", "test"):
            part, path = getattr(rows, name), Path(folder) / f"x_{name}.npy"
            with open(path, "wb") as out:  # the header np.save writes, so that the files are the same
                np.lib.format.write_array_header_1_0(out, {"descr": "<i4", "fortran_order": False,
                                                           "shape": (len(part), cfg.sequence_length)})
                start, row_bytes = out.tell(), 4 * cfg.sequence_length
                out.truncate(start + row_bytes * len(part))
                for positions in _chunks(reviews, part):
                    ids = textmodel.encode(index, read(part[positions]), cfg.sequence_length, cfg.truncate)
                    for position, row in zip(positions.tolist(), ids):
                        os.pwrite(out.fileno(), row.tobytes(), start + row_bytes * position)
            arrays[f"x_{name}"] = np.load(path, mmap_mode="r")
            arrays[f"y_{name}"] = reviews.label[part].astype(np.float32)
    return Encoded(vocabulary=vocabulary, **arrays)
