"""Text in, token ids out, and the raw-text model that MLflow logs and serves.

This file is self-contained on purpose: MLflow logs it as "model code" beside the trained Keras
classifier, so a logged model predicts from raw review strings with no dependency on this package.
Training vectorizes with the same functions, so what is served is what was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

# Keras's own "lower_and_strip_punctuation" set; the raw reviews also carry HTML line breaks, which
# that standardizer would turn into a token "br" in every other review, so they become spaces first.
PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
LINE_BREAK = r"<br\s*/?>"
CLASSIFIER_FILE = "classifier.keras"
VOCABULARY_FILE = "vocabulary.json"


def standardize(texts):
    """Lower case, HTML line breaks to spaces, punctuation removed (a tf.string tensor in and out)."""
    import tensorflow as tf

    texts = tf.strings.lower(texts)
    texts = tf.strings.regex_replace(texts, LINE_BREAK, " ")
    return tf.strings.regex_replace(texts, PUNCTUATION, "")


def make_vectorizer(vocabulary_size: int, vocabulary: Sequence[str] | None = None):
    """A TextVectorization layer with this project's standardization, ragged int output."""
    from keras import layers

    return layers.TextVectorization(
        max_tokens=vocabulary_size,
        standardize=standardize,
        output_mode="int",
        ragged=True,  # truncation and padding happen in encode(), so either end can be kept
        vocabulary=list(vocabulary) if vocabulary is not None else None,
    )


def encode(vectorizer, texts: Sequence[str], sequence_length: int, truncate: str,
           batch_size: int = 8192) -> np.ndarray:
    """Token ids, shape (len(texts), sequence_length), int32, 0-padded at the end.

    truncate="pre" keeps a review's last `sequence_length` tokens, as keras pad_sequences does by
    default (and so the tutorial); "post" keeps its first tokens.
    """
    import tensorflow as tf

    out = np.zeros((len(texts), sequence_length), dtype=np.int32)
    for start in range(0, len(texts), batch_size):
        ragged = vectorizer(tf.constant(list(texts[start:start + batch_size]), dtype=tf.string))
        kept = ragged[:, -sequence_length:] if truncate == "pre" else ragged[:, :sequence_length]
        dense = kept.to_tensor(default_value=0, shape=[None, sequence_length]).numpy()
        out[start:start + len(dense)] = dense
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


try:
    import mlflow.pyfunc

    class RawTextModel(mlflow.pyfunc.PythonModel):
        """Review strings in, probability of a positive review out (one float per review)."""

        def load_context(self, context) -> None:
            import keras

            spec = json.loads(Path(context.artifacts["vocabulary"]).read_text())
            self.sequence_length = spec["sequence_length"]
            self.truncate = spec["truncate"]
            self.vectorizer = make_vectorizer(len(spec["vocabulary"]), spec["vocabulary"])
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
            ids = encode(self.vectorizer, texts, self.sequence_length, self.truncate)
            probabilities = self.classifier.predict(ids, batch_size=4096, verbose=0)
            return probabilities.reshape(-1).astype(np.float64)

    mlflow.models.set_model(RawTextModel())
except ImportError:  # vectorizing for training needs no MLflow
    pass
