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


def standardize(text: str) -> bytes:
    """Lower case, HTML line breaks to spaces, punctuation removed, as UTF-8 bytes."""
    raw = text.encode("utf-8").lower()
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
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokens(text, standardized=standardized))
    ranked = heapq.nlargest(max(vocabulary_size - 2, 0), counts.items(), key=lambda item: (item[1], item[0]))
    return [PAD, UNKNOWN] + [token.decode("utf-8") for token, _ in ranked]


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


def save_vocabulary(path: Path, vocabulary: Sequence[str], sequence_length: int, truncate: str) -> None:
    Path(path).write_text(json.dumps(
        {"vocabulary": list(vocabulary), "sequence_length": sequence_length, "truncate": truncate}))


def as_texts(model_input: Any) -> list[str]:
    """Accept what users pass to predict: a DataFrame (column `text`, else its only column), a
    Series, a list or array of strings, or a single string."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            column = model_input["text"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a `text` column, got columns {list(model_input.columns)}")
        values = column.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, dict) and "text" in model_input:
        values = list(np.atleast_1d(model_input["text"]))
    else:
        values = list(np.asarray(model_input, dtype=object).reshape(-1))
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"every input must be a review string; got {len(bad)} of type {bad[0]}")
    return values


def _raw_text_model_class():
    import mlflow.pyfunc

    class RawTextModel(mlflow.pyfunc.PythonModel):
        """Review strings in, probability of a positive review out (one float per review)."""

        def load_context(self, context) -> None:
            import keras

            spec = json.loads(Path(context.artifacts["vocabulary"]).read_text())
            self.sequence_length = spec["sequence_length"]
            self.truncate = spec["truncate"]
            self.index = token_index(spec["vocabulary"])
            # safe_mode refuses to deserialize arbitrary code (lambdas) from the file
            self.classifier = keras.saving.load_model(context.artifacts["classifier"], compile=False,
                                                      safe_mode=True)

        # The logged signature (one unnamed string column) makes MLflow hand predict a DataFrame, from a
        # Python list, a DataFrame or any REST body. A list[str] hint instead would make MLflow's server
        # accept only {"inputs": ...} bodies; pd.DataFrame is a hint MLflow documents as not inferred from.
        def predict(self, context, model_input: "pd.DataFrame", params=None) -> np.ndarray:
            texts = as_texts(model_input)
            if not texts:
                return np.zeros((0,), dtype=np.float64)
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


if "mlflow" in sys.modules:  # MLflow is loading this file as a model's code
    import mlflow.models

    mlflow.models.set_model(__getattr__("RawTextModel")())
