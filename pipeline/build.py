"""Stage 3, build: the text vectorization, adapted on training reviews only, and the model.

In: Splits and a BuildConfig. Out: Encoded (token-id matrices and labels for train, validation and
test, plus the vocabulary), and an uncompiled-to-compiled Keras model: Embedding -> GlobalAveragePooling1D
-> Dense(relu) x hidden_layers -> Dense(1, sigmoid), with the tutorial's values by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import textmodel
from pipeline.config import BuildConfig

VECTORIZE_FIELDS = ("vocabulary_size", "sequence_length", "truncate")  # what the encoded arrays depend on


@dataclass
class Encoded:
    vocabulary: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    ARRAYS = ("x_train", "y_train", "x_validation", "y_validation", "x_test", "y_test")


def vectorize(splits, cfg: BuildConfig) -> Encoded:
    """Adapt the vocabulary on the training part only, then encode every split with it. `splits`: the
    split stage's Splits (train, validation and test tables)."""
    train = [textmodel.standardize(text) for text in splits.train["text"]]  # once, for counting and encoding
    vocabulary = textmodel.adapt(train, cfg.vocabulary_size, standardized=True)
    index = textmodel.token_index(vocabulary)

    def encode(frame):
        ids = textmodel.encode(index, frame["text"].tolist(), cfg.sequence_length, cfg.truncate)
        return ids, frame["label"].to_numpy(dtype=np.float32)

    x_train = textmodel.encode(index, train, cfg.sequence_length, cfg.truncate, standardized=True)
    y_train = splits.train["label"].to_numpy(dtype=np.float32)
    del train
    x_validation, y_validation = encode(splits.validation)
    x_test, y_test = encode(splits.test)
    return Encoded(vocabulary, x_train, y_train, x_validation, y_validation, x_test, y_test)


def build_model(cfg: BuildConfig, vocabulary_size: int, sequence_length: int | None = None, seed: int = 42):
    """The tutorial's classifier (with configurable widths, depth, dropout and optimizer), compiled.
    The seed fixes the initial weights."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(sequence_length or cfg.sequence_length,), dtype="int32", name="token_ids")
    x = layers.Embedding(vocabulary_size, cfg.embedding_dim, name="embedding")(inputs)
    x = layers.GlobalAveragePooling1D(name="average")(x)
    if cfg.dropout_rate:
        x = layers.Dropout(cfg.dropout_rate)(x)
    for index in range(cfg.hidden_layers):
        x = layers.Dense(cfg.hidden_units, activation="relu", name=f"hidden_{index + 1}")(x)
        if cfg.dropout_rate:
            x = layers.Dropout(cfg.dropout_rate)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="positive")(x)
    model = keras.Model(inputs, outputs, name="imdb_sentiment")
    optimizer = keras.optimizers.get({"class_name": cfg.optimizer, "config": {"learning_rate": cfg.learning_rate}})
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    return model


def summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines)
