"""Text in, token ids out, and the raw-text model that MLflow logs and serves.

This file is self-contained on purpose: MLflow logs it as "model code" beside the trained Keras
classifier, so a logged model predicts from raw review strings with no dependency on this package.
Training vectorizes with the same functions, so what is served is what was trained.
"""

from __future__ import annotations

import heapq
import json
import re
import sys
from collections import Counter
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

# Keras's own "lower_and_strip_punctuation" rules, done on UTF-8 bytes in plain Python: ASCII letters
# lower-cased (as tf.strings.lower does), ASCII punctuation deleted, split on ASCII whitespace. The raw
# reviews also carry HTML line breaks, which would otherwise become a token "br" in every other review,
# so they become spaces first. This gives TextVectorization's tokens and, with `adapt`, its ids, as fast
# (about 2.5 s for the 50,000 reviews) but with no TensorFlow: training and serving share these functions.
PUNCTUATION = b'!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\''
LINE_BREAK = re.compile(rb"<br\s*/?>")
PAD, UNKNOWN = "", "[UNK]"  # ids 0 and 1, as TextVectorization numbers them
CLASSIFIER_FILE = "classifier.keras"
VOCABULARY_FILE = "vocabulary.json"
ENCODE_CHUNK = 4096  # reviews tokenized at once: their token lists are about 10 KB a review while they live
TEXT = "text"  # the review's column in a table sent to the served model (any other column is ignored)


def standardize(text: str) -> bytes:
    """Lower case, HTML line breaks to spaces, punctuation removed, as UTF-8 bytes."""
    return standardize_utf8(text.encode("utf-8"))


def standardize_utf8(raw: bytes) -> bytes:
    """standardize() of a text given as its UTF-8 bytes (as a table's file holds it)."""
    raw = raw.lower()
    if b"<br" in raw:
        raw = raw.replace(b"<br />", b" ")  # nearly every break is written so; the pattern takes the rest
        if b"<br" in raw:
            raw = LINE_BREAK.sub(b" ", raw)
    return raw.translate(None, PUNCTUATION)


def tokens(text: str | bytes, keep: int | None = None, truncate: str = "pre",
           standardized: bool = False) -> list[bytes]:
    """The review's tokens; with `keep`, only its last (truncate="pre") or first ("post") `keep`
    tokens, split off without making the others. `standardized`: `text` is standardize()'s output."""
    clean = text if standardized else standardize(text)
    if keep is None:
        return clean.split()
    if truncate == "pre":
        parts = clean.rsplit(None, keep)
        return parts[1:] if len(parts) > keep else parts
    parts = clean.split(None, keep)
    return parts[:keep]


def adapt(texts: Iterable[str | bytes], vocabulary_size: int, standardized: bool = False) -> list[str]:
    """The vocabulary: padding, out-of-vocabulary, then the most frequent tokens of `texts`,
    `vocabulary_size` entries in all. Ties go to the later token in byte order, as TextVectorization
    breaks them, so that both number the tokens alike."""
    return ranked(count(texts, standardized), vocabulary_size)


def count(texts: Iterable[str | bytes], standardized: bool = False) -> Counter:
    """How often each token (bytes) occurs in `texts`: what adapt ranks (summed over chunks for a big table)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokens(text, standardized=standardized))
    return counts


def ranked(counts: Counter, vocabulary_size: int) -> list[str]:
    """adapt's vocabulary from the counts of the tokens (bytes) of the training texts."""
    top = heapq.nlargest(max(vocabulary_size - 2, 0), counts.items(), key=lambda item: (item[1], item[0]))
    return [PAD, UNKNOWN] + [token.decode("utf-8") for token, _ in top]


def token_index(vocabulary: Sequence[str]) -> dict[bytes, int]:
    return {token.encode("utf-8"): index for index, token in enumerate(vocabulary) if index >= 2}


def encode(index: dict[bytes, int], texts: Sequence[str | bytes], sequence_length: int, truncate: str,
           standardized: bool = False) -> np.ndarray:
    """Token ids, shape (len(texts), sequence_length), int32, 0-padded at the end; unknown tokens are 1.

    truncate="pre" keeps a review's last `sequence_length` tokens, as keras pad_sequences does by
    default (and so the tutorial); "post" keeps its first tokens.
    """
    out = np.zeros((len(texts), sequence_length), dtype=np.int32)
    columns = np.arange(sequence_length)[None, :]
    for start in range(0, len(texts), ENCODE_CHUNK):  # a chunk's token lists at a time, not the corpus's
        kept = [tokens(text, sequence_length, truncate, standardized) for text in texts[start:start + ENCODE_CHUNK]]
        lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        ids = np.fromiter(map(index.get, chain.from_iterable(kept), repeat(1)), dtype=np.int32,
                          count=int(lengths.sum()))
        out[start:start + len(kept)][columns < lengths[:, None]] = ids  # row by row, left-aligned
    return out


# -- bags of n-grams (the fasttext and nbsvm families) ---------------------------------------------
# A review becomes the set of its distinct word n-grams (1..ngrams words) that the n-gram vocabulary
# holds, as ids 1..len(codes) (0 pads the row). An n-gram is coded as one integer from its words' ids
# in `vocabulary` (every training token; 1 for a token training never saw): code = id1*V^2 + id2*V + id3
# with V = len(vocabulary), so n-grams are counted and looked up in numpy, not as Python strings.
def _codes(index: dict[bytes, int], texts: Sequence[str | bytes], ngrams: int, base: int,
           standardized: bool) -> tuple[np.ndarray, np.ndarray]:
    """(code, row) of every n-gram occurrence in `texts`."""
    kept = [tokens(text, standardized=standardized) for text in texts]
    lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
    flat = np.fromiter(map(index.get, chain.from_iterable(kept), repeat(1)), dtype=np.int64, count=int(lengths.sum()))
    row = np.repeat(np.arange(len(kept)), lengths)
    room = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(flat))  # tokens from here to the review's end
    codes, rows, code = [flat], [row], flat
    for n in range(2, ngrams + 1):
        code = code[:-1] * base + flat[n - 1:]  # code[p]: the n words from position p
        whole = room[:len(code)] >= n  # not running into the next review
        codes.append(code[whole])
        rows.append(row[:len(code)][whole])
    return np.concatenate(codes), np.concatenate(rows)


def _sorted_set(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (NumPy 2's hashing np.unique is several times slower on these arrays)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _distinct(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The codes, each once per row."""
    inverse, uniques = pd.factorize(codes)
    width = int(rows.max(initial=0)) + 1
    return uniques[_sorted_set(inverse.astype(np.int64) * width + rows) // width]


def adapt_ngrams(texts: Sequence[str | bytes], ngrams: int, min_count: int, size: int,
                 standardized: bool = False) -> tuple[list[str], np.ndarray]:
    """(vocabulary of every token, n-gram codes): the n-grams found in at least `min_count` of `texts`,
    the most frequent `size` of them, most frequent first (ties: the smaller code)."""
    vocabulary = adapt(texts, sys.maxsize, standardized)
    if len(vocabulary) ** ngrams >= 2 ** 63:
        raise ValueError(f"build.ngrams={ngrams}: {len(vocabulary):,} words make n-gram codes too large; use fewer")
    index, found = token_index(vocabulary), []
    for start in range(0, len(texts), ENCODE_CHUNK):
        found.append(_distinct(*_codes(index, texts[start:start + ENCODE_CHUNK], ngrams, len(vocabulary),
                                       standardized)))
    counts = pd.Series(np.concatenate(found)).value_counts()
    counts = counts[counts >= min_count]
    order = np.lexsort((counts.index.to_numpy(), -counts.to_numpy()))[:size]
    return vocabulary, counts.index.to_numpy()[order].astype(np.int64)


def encode_ngrams(index: dict[bytes, int], codes: pd.Index, texts: Sequence[str | bytes], ngrams: int,
                  base: int, sequence_length: int, standardized: bool = False) -> np.ndarray:
    """Each review's distinct n-gram ids (its most frequent `sequence_length`, ascending), 0-padded:
    shape (len(texts), sequence_length), int32. `codes`: adapt_ngrams's codes as a pandas Index."""
    out = np.zeros((len(texts), sequence_length), dtype=np.int32)
    for start in range(0, len(texts), ENCODE_CHUNK):
        found, rows = _codes(index, texts[start:start + ENCODE_CHUNK], ngrams, base, standardized)
        ids = codes.get_indexer(found) + 1  # 0: not in the vocabulary
        width = len(codes) + 1
        pairs = _sorted_set(rows[ids > 0] * width + ids[ids > 0])  # by row, then id
        rows, ids = pairs // width, pairs % width
        per_row = np.bincount(rows, minlength=min(ENCODE_CHUNK, len(texts) - start))
        place = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        fits = place < sequence_length
        out[start + rows[fits], place[fits]] = ids[fits]
    return out


def save_vocabulary(path: Path, vocabulary: Sequence[str], sequence_length: int, truncate: str,
                    ngrams: int = 0, codes: Sequence[int] = ()) -> None:
    """What serving needs to encode text as training did. ngrams=0: token-id sequences."""
    Path(path).write_text(json.dumps({"vocabulary": list(vocabulary), "sequence_length": sequence_length,
                                      "truncate": truncate, "ngrams": ngrams, "codes": [int(c) for c in codes]}))


def review_column(model_input: Any) -> Any:
    """A table's reviews chosen by name: its column `text`, whatever other columns it has and in any order;
    a table of one column, whatever its name; a table of several columns without `text` is refused, naming
    them. A table is a DataFrame, a dict of columns, or a list of records (dicts); anything else (a string,
    a list of strings) is returned as it is."""
    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if TEXT in columns:
            return model_input[[TEXT]]
    elif isinstance(model_input, dict):
        columns = list(model_input)
        if TEXT in columns:
            return {TEXT: model_input[TEXT]}
    elif isinstance(model_input, list) and model_input and all(isinstance(row, dict) for row in model_input):
        columns = list(dict.fromkeys(key for row in model_input for key in row))
        if TEXT in columns:
            return [{TEXT: row.get(TEXT)} for row in model_input]
    else:
        return model_input
    if len(columns) > 1:
        shown = ", ".join(map(repr, columns[:10])) + (", ..." if len(columns) > 10 else "")
        raise ValueError(f"no column `{TEXT}` among the {len(columns)} columns sent ({shown}): name the review's "
                         f"column `{TEXT}` (the others are ignored), or send the reviews alone")
    return model_input


def as_texts(model_input: Any) -> list[str]:
    """Accept what users pass to predict: a table (a DataFrame, records or a dict of columns: its column
    `text`, else its only column), a Series, a list or array of strings, or a single string. Anything else
    in them is refused, naming the first bad input's position and type: a null, a number, an object or a
    list is not a review, and neither is an empty string (training refuses empty reviews too)."""
    model_input = review_column(model_input)
    if isinstance(model_input, pd.DataFrame):
        values = model_input.iloc[:, 0].tolist() if model_input.shape[1] else []
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, dict) and TEXT in model_input:
        values = list(np.atleast_1d(model_input[TEXT]))
    elif isinstance(model_input, list) and model_input and all(isinstance(row, dict) for row in model_input):
        values = [next(iter(row.values()), None) for row in model_input]
    else:
        values = list(np.asarray(model_input, dtype=object).reshape(-1))
    values = [v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for v in values]
    bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    if bad:
        position, value = bad[0]
        null = value is None or value is pd.NA or (isinstance(value, float) and value != value)
        what = ("an empty string" if isinstance(value, str) else "null" if null
                else f"{type(value).__name__} {value!r:.60}")
        more = f" ({len(bad)} bad inputs in all)" if len(bad) > 1 else ""
        raise ValueError(f"input {position} (counting from 0) is {what}, not a review: every input must be "
                         f"a non-empty string{more}")
    return values


def _raw_text_model_class():
    import mlflow.pyfunc

    class RawTextModel(mlflow.pyfunc.PythonModel):
        """Review strings in, probability of a positive review out (one float per review)."""

        reads_reviews_by_name = True  # what read_reviews_by_name looks for

        def load_context(self, context) -> None:
            import keras

            spec = json.loads(Path(context.artifacts["vocabulary"]).read_text())
            self.sequence_length, self.truncate = spec["sequence_length"], spec["truncate"]
            self.ngrams, self.base = spec.get("ngrams", 0), len(spec["vocabulary"])
            self.index, self.codes = token_index(spec["vocabulary"]), pd.Index(spec.get("codes", []), dtype=np.int64)
            # safe_mode refuses to deserialize arbitrary code (lambdas) from the file
            self.classifier = keras.saving.load_model(context.artifacts["classifier"], compile=False,
                                                      safe_mode=True)

        # The logged signature (one unnamed column) makes MLflow hand predict a DataFrame of one column (see
        # read_reviews_by_name), from a Python list, a DataFrame or any JSON body. Its type is Any, not string:
        # for a string column MLflow's server casts a JSON body's values with numpy (null -> "None", 123 -> "123")
        # before predict sees them; with Any they arrive as sent and as_texts refuses them. A list[str] hint
        # would make the server accept only {"inputs": ...} bodies; pd.DataFrame is a hint MLflow does not infer from.
        def predict(self, context, model_input: "pd.DataFrame", params=None) -> np.ndarray:
            from mlflow.exceptions import MlflowException

            try:
                texts = as_texts(model_input)
            except ValueError as error:  # MLflow's server answers this one 400 with the message
                raise MlflowException.invalid_parameter_value(str(error)) from None
            if not texts:
                return np.zeros((0,), dtype=np.float64)
            if self.ngrams:
                ids = encode_ngrams(self.index, self.codes, texts, self.ngrams, self.base, self.sequence_length)
            else:
                ids = encode(self.index, texts, self.sequence_length, self.truncate)
            probabilities = self.classifier.predict(ids, batch_size=4096, verbose=0)
            return probabilities.reshape(-1).astype(np.float64)

    return RawTextModel


def __getattr__(name: str):
    # RawTextModel is made on first use, so that tokenizing for training does not import MLflow.
    if name == "RawTextModel":
        globals()[name] = _raw_text_model_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_reviews_by_name() -> None:
    """Have MLflow hand this model a table's column `text`, not its first column: its check of the logged
    signature (one unnamed column) keeps a table's first column only (_enforce_unnamed_col_schema), so
    PyFuncModel.predict, which the server calls too, picks the column by name first, for this file's models
    and no other (docs/serving.md says why the signature stays). Installed when MLflow loads this file."""
    import functools

    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PyFuncModel

    predict = PyFuncModel.predict
    if getattr(predict, "reads_reviews_by_name", False):
        return

    @functools.wraps(predict)
    def by_name(self, data, params=None):
        if getattr(getattr(getattr(self, "_model_impl", None), "python_model", None), "reads_reviews_by_name", False):
            try:
                data = review_column(data)
            except ValueError as error:  # MLflow's server answers this one 400 with the message
                raise MlflowException.invalid_parameter_value(str(error)) from None
        return predict(self, data, params)

    by_name.reads_reviews_by_name = True
    PyFuncModel.predict = by_name


# MLflow loads a model's code by running this file as a module of its own, outside any package (models from
# code); imported as part of the pipeline package it sets nothing.
if not __package__ and "mlflow" in sys.modules:
    import mlflow.models

    read_reviews_by_name()
    mlflow.models.set_model(__getattr__("RawTextModel")())
