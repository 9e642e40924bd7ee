"""A table's reviews vectorized as they are read from its file: chunk by chunk, on every core, in one pass.

In: the split stage's Splits of a table whose texts stay in its file (each frame has the row number of each
review there, `row`; ingest's Reviews.table says which file and column), and a BuildConfig. Out: the vocabulary
and the train, validation and test id matrices, exactly as build.vectorize makes them from texts in memory
(tests/test_stages.py checks), ids kept compact (uint16 while the vocabulary fits).

One pass over the file: this process reads it, ROWS rows at a time, and hands each chunk's texts (their UTF-8,
as the file's reader holds them) to one worker process a core (pipeline/workers.py; the workers end with the
stage, whether it ends, fails or is interrupted). A worker standardizes each review with textmodel's own
function, has Arrow split them on ASCII whitespace and number the chunk's distinct tokens (codes), and gives
each distinct token an id of a dictionary of its own, kept from chunk to chunk: a dictionary lookup per distinct
token, not per token. It sends back the tokens new to it, its id of each code, each review's kept tokens (its
last or first sequence_length) as codes, 2 bytes each, and the counts of the codes in the chunk's training
reviews (all their tokens). Here every token gets a provisional id, the counts are summed, and the codes go
straight into the reviews' rows of the compact arrays; once the file is read, the vocabulary is ranked from the
counts (textmodel.ranked) and each chunk's codes are turned into its ids (1 for a token outside it) in place.
Memory holds the ids, a few chunks and the tokens, never the whole text. A chunk of more distinct tokens than
2-byte codes hold (LOCAL) keeps its 4-byte codes aside until then.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from itertools import repeat
from typing import Iterator

import numpy as np
import pandas as pd

from pipeline import textmodel
from pipeline.console import Progress
from pipeline.tables import TableTexts
from pipeline.workers import Workers, cores, spawnable

POOL_ROWS = 100_000  # fewer reviews than this are done in this process: a pool's start costs about a second
ROWS = 5_000  # reviews a chunk: their distinct tokens (about 40,000 in IMDB's) fit 2-byte codes
LOCAL = 1 << 16  # a chunk's codes (its distinct tokens, and 0) that fit the output's 2-byte ids


def compact(ids: int):
    """The smallest type that holds `ids` ids (0 to ids - 1): 2 bytes a token up to 65,536 of them."""
    return np.uint16 if ids <= 1 << 16 else np.int32


def vectorize_table(splits, table: TableTexts, cfg, workers: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """(vocabulary, [x_train, x_validation, x_test]) of the reviews in `table`'s file that `splits` holds.
    `workers`: processes to use (default: one a core, none for fewer than POOL_ROWS reviews)."""
    rows = [part["row"].to_numpy() for part in (splits.train, splits.validation, splits.test)]
    size = max(int(numbers.max(initial=-1)) for numbers in rows) + 1
    part, place = np.full(size, -1, dtype=np.int8), np.zeros(size, dtype=np.int64)  # each file row: where it goes
    for code, numbers in enumerate(rows):
        part[numbers], place[numbers] = code, np.arange(len(numbers))
    if workers is None:
        workers = cores() if sum(map(len, rows)) >= POOL_ROWS and cores() > 1 and spawnable() else 0
    dtype = compact(cfg.vocabulary_size)  # (the vocabulary has at most so many ids)
    words, ids = Words(), [np.zeros((len(numbers), cfg.sequence_length), dtype=dtype) for numbers in rows]
    shown = Progress("vectorize: reading and encoding the reviews", sum(map(len, rows)))
    settings = (uuid.uuid4().hex, cfg.sequence_length, cfg.truncate)  # (a new dictionary in each worker)
    try:
        with Workers(workers) as pool:
            for kept, found, worker in pool.map(_tokenize, _chunks(table, part, place), settings):
                words.add(kept, worker, *found, ids)
                shown.update(shown.done + len(kept[0]))
    finally:
        shown.close()
        _WORDS.update(session=None, index={})  # (this process's, when it did the work)
    vocabulary = textmodel.ranked(words.counts(), cfg.vocabulary_size)
    words.finish(vocabulary, ids)
    return vocabulary, [x.astype(compact(len(vocabulary)), copy=False) for x in ids]


class Words:
    """The tokens the workers found, each with a provisional id (from 1, in the order they were first heard of
    here; 0 pads) and its count over the training reviews; and for each chunk, where its reviews went and the
    provisional id of each of its codes, which its reviews' rows hold until the vocabulary is known."""

    def __init__(self):
        self.index: dict[bytes, int] = {}
        self.tokens: list[bytes] = [b""]
        self.counted = np.zeros(1, dtype=np.int64)
        self.workers: dict[int, np.ndarray] = {}  # a worker's number -> the provisional id of each of its ids
        self.chunks: list[tuple] = []  # (codes, places, provisional id of each code, the rows if not in place)

    def add(self, kept: tuple, worker: int, new: list[bytes], known: np.ndarray, coded: np.ndarray, counted: tuple,
            ids: list[np.ndarray]) -> None:
        """A worker's chunk (see _tokenize): its counts added, its reviews' codes put in their rows of `ids`."""
        numbers = np.fromiter(map(self.index.get, new, repeat(0)), dtype=np.int32, count=len(new))
        fresh = [token for token, number in zip(new, numbers.tolist()) if not number]
        if fresh:
            self.index.update(zip(fresh, range(len(self.tokens), len(self.tokens) + len(fresh))))
            self.tokens += fresh
            numbers = np.fromiter(map(self.index.__getitem__, new), dtype=np.int32, count=len(new))
            self.counted = np.concatenate([self.counted, np.zeros(len(fresh), dtype=np.int64)])
        mapping = self.workers[worker] = np.concatenate([self.workers.get(worker, np.zeros(1, np.int32)), numbers])
        provisional = mapping[known]  # (code 0, padding, is worker id 0, provisional id 0)
        found, times = counted
        self.counted[provisional[found]] += times  # (distinct codes: distinct provisional ids)
        codes, places = kept
        wide = coded.dtype.itemsize > ids[0].dtype.itemsize  # (more codes than 2 bytes hold: kept aside)
        if not wide:
            for code, x in enumerate(ids):
                x[places[codes == code]] = coded[codes == code]
        self.chunks.append((codes, places, provisional, coded if wide else None))

    def counts(self) -> dict[bytes, int]:
        """{token: count} of the tokens of the training reviews: what textmodel.ranked ranks."""
        seen = np.flatnonzero(self.counted)
        return dict(zip([self.tokens[number] for number in seen.tolist()], self.counted[seen].tolist()))

    def finish(self, vocabulary: list[str], ids: list[np.ndarray]) -> None:
        """Turn each chunk's codes in `ids` into ids of `vocabulary` (0 padding, 1 a token outside it)."""
        final = np.ones(len(self.tokens), dtype=ids[0].dtype)
        final[0] = 0
        final[[self.index[token.encode("utf-8")] for token in vocabulary[2:]]] = np.arange(2, len(vocabulary))
        while self.chunks:
            codes, places, provisional, wide = self.chunks.pop(0)
            mapped = final[provisional]
            for code, x in enumerate(ids):
                rows = places[codes == code]
                x[rows] = mapped[x[rows] if wide is None else wide[codes == code]]


def with_texts(splits, table: TableTexts):
    """`splits` with each review's text (column `text`) read from `table`'s file: what the bag families, which
    count n-grams over the training texts at once, need in memory."""
    parts = {name: getattr(splits, name) for name in ("train", "validation", "test")}
    texts = table.at(np.concatenate([part["row"].to_numpy() for part in parts.values()])).to_numpy()
    ends = np.cumsum([len(part) for part in parts.values()])
    return replace(splits, **{name: part.assign(text=texts[end - len(part):end])
                              for end, (name, part) in zip(ends, parts.items())})


def _chunks(table: TableTexts, part: np.ndarray, place: np.ndarray) -> Iterator:
    """((codes, places), (UTF-8, ends, training)) of each chunk of the file: the texts of its reviews that go into
    the arrays, one after another, with the end of each; which array each goes into (0 train, 1 validation,
    2 test) and at which row; whether it is a training review."""
    for start, texts in table.columns(ROWS):
        numbers = np.arange(start, min(start + len(texts), len(part)))
        codes = part[numbers]
        chosen = np.flatnonzero(codes >= 0)
        if len(chosen):
            yield (codes[chosen], place[numbers[chosen]]), (*_utf8(texts, chosen), codes[chosen] == 0)


def _utf8(texts: pd.Series, chosen: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The UTF-8 of texts[chosen], one after another, and where each ends: a column of Arrow strings (as pandas
    reads a CSV and Parquet) gives it with no Python string a review."""
    if isinstance(texts.array, pd.arrays.ArrowStringArray):
        import pyarrow as pa

        column = pa.array(texts.array)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        column = column.take(pa.array(chosen)) if len(chosen) < len(column) else column
        width = np.int64 if pa.types.is_large_string(column.type) else np.int32
        ends = np.frombuffer(column.buffers()[1], dtype=width)[column.offset:column.offset + len(column) + 1]
        data = column.buffers()[2]
        return (bytes(memoryview(data)[ends[0]:ends[-1]]) if data is not None else b""), (ends[1:] - ends[0]).astype(np.int64)
    encoded = [text.encode("utf-8") for text in texts.iloc[chosen].tolist()]
    return b"".join(encoded), np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))


_WORDS: dict = {"session": None, "index": {}}  # a worker's dictionary: its tokens' ids, kept from chunk to chunk


def _tokenize(work: tuple, session: str, length: int, truncate: str) -> tuple:
    """In a worker: (tokens new to it, in the order of their ids; its id of each of the chunk's codes (1 up: its
    distinct tokens; 0: padding); each review's kept tokens as codes, shape (reviews, length), 0-padded at the end,
    2 bytes a code where they fit (LOCAL); (codes, counts) of the tokens of the training reviews). Each review is
    standardized by textmodel's own function; Arrow splits them on ASCII whitespace (bytes.split()'s, but with an
    empty token for whitespace at either end, left out here) and numbers the chunk's distinct tokens, so that
    only those, not every token, become Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data, ends, training = work
    if _WORDS["session"] != session:
        _WORDS.update(session=session, index={})
    index, starts = _WORDS["index"], np.concatenate([[0], ends[:-1]]).tolist()
    clean = [textmodel.standardize_utf8(data[a:b]) for a, b in zip(starts, ends.tolist())]
    offsets = np.zeros(len(clean) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, clean), dtype=np.int64, count=len(clean)), out=offsets[1:])
    texts = pa.Array.from_buffers(pa.large_string(), len(clean), [None, pa.py_buffer(offsets),
                                                                  pa.py_buffer(b"".join(clean))])
    del clean
    words = pc.ascii_split_whitespace(texts)
    coded = pc.dictionary_encode(words.values)
    codes, bounds = coded.indices.to_numpy() + 1, words.offsets.to_numpy().astype(np.int64)
    distinct = [b""] + coded.dictionary.view(pa.large_binary()).to_pylist()
    ids = np.fromiter(map(index.get, distinct, repeat(0)), dtype=np.int32, count=len(distinct))
    unknown = [code for code in np.flatnonzero(ids == 0).tolist() if distinct[code]]  # (b"": no token)
    new = [distinct[code] for code in unknown]
    ids[unknown] = np.arange(len(index) + 1, len(index) + 1 + len(new))
    index.update(zip(new, range(len(index) + 1, len(index) + 1 + len(new))))
    starts, ends = _words(bounds, codes, ids)
    counted = np.bincount(codes[np.repeat(training, np.diff(bounds))], minlength=len(distinct))
    found = np.flatnonzero(counted * (ids > 0))  # (the empty token, id 0, is no token)
    lengths = ends - starts
    kept = np.minimum(lengths, length)  # the last `length` tokens (pre) or the first (post)
    first = starts + (lengths - kept if truncate == "pre" else 0)
    source = np.repeat(first - (np.cumsum(kept) - kept), kept) + np.arange(int(kept.sum()))
    out = np.zeros((len(ends), length), dtype=np.uint16 if len(distinct) <= LOCAL else np.int32)
    out[np.arange(length)[None, :] < kept[:, None]] = codes[source]
    return new, ids, out, (found, counted[found])


def _words(bounds: np.ndarray, codes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each review's tokens start and end, without the empty tokens (id 0) that Arrow's split gives for
    whitespace at either end of a review (and for a review of none but whitespace)."""
    starts, ends = bounds[:-1].copy(), bounds[1:].copy()
    if not len(ends) or ids[1:].all():
        return starts, ends
    starts += ids[codes[np.minimum(starts, max(len(codes) - 1, 0))]] == 0
    ends -= (ends > starts) & (ids[codes[np.maximum(ends - 1, 0)]] == 0)
    if int((ends - starts).sum()) == np.count_nonzero(ids[codes]):
        return starts, ends
    raise RuntimeError("Arrow's split gave an empty token within a review")  # (not as documented: stop, not guess)
