"""Stage 3, build: the text vectorization, adapted on training reviews only, and the model.

In: Splits and a BuildConfig. Out: Encoded (id matrices and labels for train, validation and test,
plus the vocabulary and, for the bag families, the n-gram codes) and a compiled Keras model of
`cfg.family`: the tutorial's (Embedding -> GlobalAveragePooling1D -> Dense(relu) -> Dense(1, sigmoid),
its values by default), fasttext, cnn or nbsvm (see their functions below and conf/build/).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import pandas as pd

from pipeline import chunks, textmodel
from pipeline.config import BAG_FAMILIES, BuildConfig
from pipeline.tables import TableTexts

VECTORIZE_FIELDS = ("vocabulary_size", "sequence_length", "truncate", "ngrams", "min_count")  # what the arrays depend on


@dataclass
class Encoded:
    vocabulary: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # bag families: the n-gram vocabulary (textmodel.adapt_ngrams)
    ngrams: int = 0  # bag families: n-grams of 1..ngrams words; 0: the rows are token-id sequences

    ARRAYS = ("x_train", "y_train", "x_validation", "y_validation", "x_test", "y_test", "codes")

    @property
    def input_size(self) -> int:
        """How many distinct ids the model's first layer takes (0 is padding)."""
        return ids(self.vocabulary, self.codes, self.ngrams)


def ids(vocabulary: list[str], codes: np.ndarray, ngrams: int) -> int:
    """How many distinct ids encoding with this vocabulary (or these n-gram codes) gives, padding included."""
    return len(codes) + 1 if ngrams else len(vocabulary)


def vectorize(splits, cfg: BuildConfig, table: TableTexts | None = None) -> Encoded:
    """Adapt the vocabulary (and the bag families' n-grams) on the training part only, then encode every
    split with it. `splits`: the split stage's Splits (train, validation and test tables); `table`: where
    their texts are when the tables hold their row numbers in a file instead (ingest=table, pipeline/chunks.py).
    The ids are compact: uint16 while the vocabulary fits."""
    ngrams = cfg.ngrams if cfg.family in BAG_FAMILIES else 0
    labels = [part["label"].to_numpy(dtype=np.float32) for part in (splits.train, splits.validation, splits.test)]
    if table is not None and not ngrams:  # read and encoded chunk by chunk, on every core
        vocabulary, (x_train, x_validation, x_test) = chunks.vectorize_table(splits, table, cfg)
        return Encoded(vocabulary, x_train, labels[0], x_validation, labels[1], x_test, labels[2])
    if table is not None:  # the bag families count n-grams over the training texts, in memory
        splits = chunks.with_texts(splits, table)
    train = [textmodel.standardize(text) for text in splits.train["text"]]  # once, for counting and encoding
    if ngrams:
        vocabulary, codes = textmodel.adapt_ngrams(train, ngrams, cfg.min_count, cfg.vocabulary_size - 1, True)
        index, lookup = textmodel.token_index(vocabulary), pd.Index(codes)

        def encode(texts, standardized=False):
            return textmodel.encode_ngrams(index, lookup, texts, ngrams, len(vocabulary), cfg.sequence_length,
                                           standardized)
    else:
        vocabulary, codes = textmodel.adapt(train, cfg.vocabulary_size, standardized=True), np.zeros(0, np.int64)
        index = textmodel.token_index(vocabulary)

        def encode(texts, standardized=False):
            return textmodel.encode(index, texts, cfg.sequence_length, cfg.truncate, standardized)

    dtype = chunks.compact(ids(vocabulary, codes, ngrams))
    x_train = encode(train, True).astype(dtype)
    del train
    x_validation, x_test = (encode(part["text"].tolist()).astype(dtype) for part in (splits.validation, splits.test))
    return Encoded(vocabulary, x_train, labels[0], x_validation, labels[1], x_test, labels[2], codes, ngrams)


def build_model(cfg: BuildConfig, vocabulary_size: int, sequence_length: int | None = None, seed: int = 42,
                train: tuple[np.ndarray, np.ndarray] | None = None):
    """The classifier of `cfg.family`, compiled. `vocabulary_size`: ids the first layer takes (the
    encoded data's input_size); `train`: (x_train, y_train), which nbsvm's ratios are counted from.
    The seed fixes the initial weights."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(sequence_length or cfg.sequence_length,), dtype="int32", name="token_ids")
    regularizer = keras.regularizers.L2(cfg.l2) if cfg.l2 else None
    outputs = FAMILY_LAYERS[cfg.family](layers, inputs, cfg, vocabulary_size, regularizer)
    model = keras.Model(inputs, outputs, name=f"imdb_sentiment_{cfg.family}")
    if cfg.family == "nbsvm":
        if train is None:
            raise ValueError("build.family=nbsvm needs the training arrays to count its ratios from")
        model.get_layer("nb_ratios").set_weights([nb_ratios(*train, vocabulary_size, cfg.smoothing)[:, None]])
    optimizer = keras.optimizers.get({"class_name": cfg.optimizer, "config": {"learning_rate": cfg.learning_rate}})
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    return model


def _tutorial(layers, inputs, cfg: BuildConfig, size: int, regularizer):
    """Embedding -> average -> Dense(relu) x hidden_layers -> Dense(1, sigmoid), dropout where set."""
    x = layers.Embedding(size, cfg.embedding_dim, embeddings_regularizer=regularizer, name="embedding")(inputs)
    x = layers.GlobalAveragePooling1D(name="average")(x)
    if cfg.dropout_rate:
        x = layers.Dropout(cfg.dropout_rate)(x)
    for index in range(cfg.hidden_layers):
        x = layers.Dense(cfg.hidden_units, activation="relu", name=f"hidden_{index + 1}")(x)
        if cfg.dropout_rate:
            x = layers.Dropout(cfg.dropout_rate)(x)
    return layers.Dense(1, activation="sigmoid", name="positive")(x)


def _fasttext(layers, inputs, cfg: BuildConfig, size: int, regularizer):
    """Joulin et al.'s fastText, as Keras's imdb_fasttext example: the average of the review's n-gram
    embeddings (padding masked out), then one logistic unit."""
    x = layers.Embedding(size, cfg.embedding_dim, mask_zero=True, embeddings_regularizer=regularizer,
                         name="embedding")(inputs)
    x = layers.GlobalAveragePooling1D(name="average")(x)
    if cfg.dropout_rate:
        x = layers.Dropout(cfg.dropout_rate)(x)
    return layers.Dense(1, activation="sigmoid", name="positive")(x)


def _cnn(layers, inputs, cfg: BuildConfig, size: int, regularizer):
    """keras-io's text_classification_from_scratch: embedding, dropout, two strided Conv1D, global max
    pooling, Dense(relu), dropout, Dense(1, sigmoid)."""
    x = layers.Embedding(size, cfg.embedding_dim, embeddings_regularizer=regularizer, name="embedding")(inputs)
    x = layers.Dropout(cfg.dropout_rate)(x)
    for index in range(2):
        x = layers.Conv1D(cfg.filters, cfg.kernel_size, strides=3, activation="relu", name=f"conv_{index + 1}")(x)
    x = layers.GlobalMaxPooling1D(name="max")(x)
    x = layers.Dense(cfg.hidden_units, activation="relu", name="hidden_1")(x)
    x = layers.Dropout(cfg.dropout_rate)(x)
    return layers.Dense(1, activation="sigmoid", name="positive")(x)


def nb_ratios(x_train: np.ndarray, y_train: np.ndarray, size: int, smoothing: float) -> np.ndarray:
    """Each n-gram id's naive-Bayes log-count ratio log((p/|p|) / (q/|q|)), p and q its smoothed counts
    in the positive and the negative training reviews (0 for the padding id)."""
    positive, negative = (smoothing + np.bincount(x_train[y_train == label].ravel(), minlength=size)[1:size]
                          for label in (1, 0))  # id 0, the padding, is no n-gram
    ratios = np.zeros(size, dtype=np.float32)
    ratios[1:] = np.log((positive / positive.sum()) / (negative / negative.sum()))
    return ratios


def _nbsvm(layers, inputs, cfg: BuildConfig, size: int, regularizer):
    """Wang & Manning's NBSVM as a logistic model (Mesnil et al.'s NB-LR): the logit sums, over the
    review's distinct n-grams, a learned weight times the n-gram's ratio (nb_ratios, a frozen layer
    that build_model fills from the training part only)."""
    weights = layers.Embedding(size, 1, embeddings_initializer="zeros", embeddings_regularizer=regularizer,
                               name="weights")(inputs)
    ratios = layers.Embedding(size, 1, trainable=False, name="nb_ratios")(inputs)
    x = layers.Flatten(name="logit")(layers.Dot(axes=1, name="weighted_sum")([weights, ratios]))
    return layers.Dense(1, activation="sigmoid", kernel_initializer="ones", name="positive")(x)


FAMILY_LAYERS = {"tutorial": _tutorial, "fasttext": _fasttext, "cnn": _cnn, "nbsvm": _nbsvm}


def summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines)
