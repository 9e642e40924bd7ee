"""Stage 4, fit: train the built model, one history row per epoch.

In: a compiled model, Encoded arrays, a FitConfig and extra Keras callbacks (the tracking module
passes one that logs each epoch as it ends). Out: Fitted, the per-epoch history as a table (epoch 1..N)
and, with early stopping, the epoch it stopped at and the best epoch whose weights were kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.build import Encoded
from pipeline.config import FitConfig

log = logging.getLogger(__name__)

CHUNK_BATCHES = 64  # batches read from disk per compiled call when the arrays stay on disk (32 MB at 512 x 256)


@dataclass
class Fitted:
    history: pd.DataFrame  # columns epoch, loss, accuracy, val_loss, val_accuracy
    stopped_epoch: Optional[int]  # last epoch trained when early stopping ended the fit
    best_epoch: Optional[int]  # the epoch whose weights the model holds after early stopping


def fit(model, data: Encoded, cfg: FitConfig, seed: int, callbacks: Sequence = ()) -> Fitted:
    """Train `model` in place on the training arrays, validating on the held-out arrays each epoch."""
    import keras

    keras.utils.set_random_seed(seed)
    stopper = None
    all_callbacks = list(callbacks)
    if cfg.early_stopping.enabled:
        stopper = keras.callbacks.EarlyStopping(
            monitor=cfg.early_stopping.monitor, patience=cfg.early_stopping.patience,
            restore_best_weights=cfg.early_stopping.restore_best_weights, verbose=1)
        all_callbacks.insert(0, stopper)
    if cfg.loop == "epoch" and keras.backend.backend() != "tensorflow":
        log.warning("fit.loop=epoch needs Keras's TensorFlow backend, not %s: using fit.loop=keras",
                    keras.backend.backend())
    if cfg.loop == "epoch" and keras.backend.backend() == "tensorflow":
        rows = EpochLoop(model, data, cfg, seed).run(cfg.epochs, all_callbacks)
    else:
        model.jit_compile = cfg.jit_compile  # read by Keras when fit builds its train function
        rows = model.fit(data.x_train, data.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         validation_data=(data.x_validation, data.y_validation), callbacks=all_callbacks,
                         verbose=2).history
    table = pd.DataFrame(rows)
    table.insert(0, "epoch", range(1, len(table) + 1))
    stopped = best = None
    if stopper is not None:
        stopped = len(table) if stopper.stopped_epoch else None
        column = table[cfg.early_stopping.monitor]
        best = int(table["epoch"][column.idxmin() if "loss" in cfg.early_stopping.monitor else column.idxmax()])
    return Fitted(history=table, stopped_epoch=stopped, best_epoch=best)


class EpochLoop:
    """Keras's fit, one compiled call per epoch: the model's own forward pass, loss and optimizer on the
    same shuffled batches of `batch_size`, with the arrays held as tensors and every step of the epoch
    (then the whole validation pass) inside one XLA program.

    Why: with arrays in memory the work per epoch is tiny (an embedding lookup and two small layers), so
    Keras's per-epoch machinery (a fresh tf.data iterator for training and validation, a call per
    `steps_per_execution` batches) costs more than the arithmetic. Every batch has a static shape: the last,
    short batch is padded and its padding carries zero weight, so its loss and gradient are those of the
    real rows, as in Keras. Batch callbacks run once per epoch, as Keras runs them with
    `steps_per_execution`; epoch callbacks (tracking, early stopping) run as in `model.fit`. The tutorial's
    model with Adam is stepped on each review's distinct ids and their counts instead of its 256 positions
    (Bags, below): the same weights up to float rounding, about a quarter less work per epoch.

    Arrays that arrive as memory maps (the streamed path's, which may not fit in memory) stay on disk:
    each epoch then reads its shuffled rows CHUNK_BATCHES batches at a time and trains on each chunk in
    one compiled call, then validates chunk by chunk; the batches and steps are those of the in-memory
    loop, so the numbers are too.
    """

    def __init__(self, model, data: Encoded, cfg: FitConfig, seed: int):
        import keras
        import tensorflow as tf

        self.model, self.batch_size = model, cfg.batch_size
        self.rng = np.random.default_rng(seed)  # the shuffle of each epoch, as fit(shuffle=True) does
        self.train_rows = len(data.x_train)
        self.steps = self._whole(self.train_rows) // cfg.batch_size
        self.validation_rows = len(data.x_validation)
        self.chunked = isinstance(data.x_train, np.memmap) or isinstance(data.x_validation, np.memmap)
        self.loss = keras.losses.get(model.loss)  # per-example losses; weighted and reduced below
        model.optimizer.build(model.trainable_variables)
        self.bags = Bags.of(model)
        # autograph off: the loops are written as tf.while_loop, and converting the code would cost tracing time
        compiled = dict(jit_compile=cfg.jit_compile, autograph=False)
        if self.chunked:  # rows read from disk a chunk at a time, passed to the compiled loops
            self.data = data
            self.chunk_weights = self._weight(self.train_rows), self._weight(self.validation_rows)
            self.validation_order = self._padded(np.arange(self.validation_rows))
            # bags: one width for every chunk, so that the compiled loops keep one shape
            self.widths = ((Bags.width(data.x_train), Bags.width(data.x_validation)) if self.bags is not None
                           else (None, None))
            self.train_steps = tf.function(lambda y, weight, *x: self._steps(x, y, weight, True), **compiled)
            self.validate_steps = tf.function(lambda y, weight, *x: self._steps(x, y, weight, False), **compiled)
            return
        train = self._inputs(data.x_train)
        self.x_train = [tf.constant(part) for part in train]
        self.y_train = tf.constant(data.y_train.reshape(-1, 1))
        self.train_weight = tf.constant(self._weight(self.train_rows))
        order = self._padded(np.arange(self.validation_rows))
        batches = (-1, cfg.batch_size)
        self.validation_inputs = [tf.constant(part[order].reshape(batches + part.shape[1:]))
                                  for part in self._inputs(data.x_validation)]
        self.validation = [tf.constant(part.reshape(batches + part.shape[1:])) for part in (
            data.y_validation[order].reshape(-1, 1), self._weight(self.validation_rows))]
        self.train_epoch = tf.function(self._train_epoch, **compiled)

    def _inputs(self, x: np.ndarray, width: Optional[int] = None) -> tuple[np.ndarray, ...]:
        """What the compiled steps read for the rows `x`: the token ids, or their bags (ids and counts)."""
        return (x,) if self.bags is None else Bags.encode(x, width)

    def _whole(self, rows: int) -> int:
        """`rows` rounded up to whole batches."""
        return -(-rows // self.batch_size) * self.batch_size

    def _padded(self, order: np.ndarray) -> np.ndarray:
        """Row numbers filled up to whole batches (with row 0, which the weights below leave out)."""
        padding = np.zeros(self._whole(len(order)) - len(order), dtype=order.dtype)
        return np.concatenate([order, padding]).astype(np.int32)

    def _weight(self, rows: int) -> np.ndarray:
        """1 for each real row, 0 for the padding, as a column."""
        return (np.arange(self._whole(rows)) < rows).astype(np.float32).reshape(-1, 1)

    def _scores(self, predicted, y, weight):
        """Summed loss and count of right answers over the weighted rows; the batch's mean loss."""
        import tensorflow as tf

        weight_1d = tf.reshape(weight, [-1])
        per_row = tf.reshape(self.loss(y, predicted), [-1]) * weight_1d
        rows = tf.reduce_sum(weight_1d)
        batch_loss = tf.reduce_sum(per_row) / rows
        if self.model.losses:  # layer regularizers, added as Keras adds them
            batch_loss += tf.add_n(self.model.losses)
        right = tf.cast(tf.equal(tf.cast(predicted > 0.5, y.dtype), y), tf.float32)  # binary_accuracy
        return batch_loss * rows, tf.reduce_sum(right * weight), batch_loss

    def _predict(self, x, training: bool):
        return self.model(*x, training=training) if self.bags is None else self.bags.predict(*x, training=training)

    def _steps(self, x, y, weight, training: bool):
        """One pass over the batches of x (a tuple: token ids, or bags), y and weight, each shaped
        (steps, batch, ...): a training step on each (training=True), or scores only. Returns summed loss
        and right answers, as [loss, right]."""
        import tensorflow as tf

        variables = self.model.trainable_variables

        def step(index, totals):
            batch = [part[index] for part in x]
            if not training:
                loss_sum, right, _ = self._scores(self._predict(batch, False), y[index], weight[index])
            elif self.bags is not None:
                loss_sum, right = self.bags.train_step(*batch, lambda predicted: self._scores(
                    predicted, y[index], weight[index]))
            else:
                with tf.GradientTape() as tape:
                    loss_sum, right, batch_loss = self._scores(self.model(*batch, training=True), y[index],
                                                               weight[index])
                self.model.optimizer.apply_gradients(zip(tape.gradient(batch_loss, variables), variables))
            return index + 1, totals + tf.stack([loss_sum, right])

        _, totals = tf.while_loop(lambda index, _: index < y.shape[0], step, (0, tf.zeros([2])))
        return totals

    def _train_epoch(self, order):
        import tensorflow as tf

        shape = (self.steps, self.batch_size)
        x = [tf.reshape(tf.gather(part, order), shape + tuple(part.shape[1:])) for part in self.x_train]
        y = tf.reshape(tf.gather(self.y_train, order), shape + (1,))
        weight = tf.reshape(self.train_weight, shape + (1,))
        return tf.concat([self._steps(x, y, weight, True), self._steps(self.validation_inputs, *self.validation,
                                                                        False)], 0)

    def _chunks(self, x, y, order: np.ndarray, weight: np.ndarray, width: Optional[int]):
        """(y, weight, *inputs) of CHUNK_BATCHES batches at a time, in the order `order` gives (padded to
        whole batches, the padding weighted 0 by `weight`); the rows are read from `x` in file order, then
        put in place."""
        rows_per_chunk = CHUNK_BATCHES * self.batch_size
        for start in range(0, len(order), rows_per_chunk):
            part = order[start:start + rows_per_chunk]
            by_position = np.argsort(part, kind="stable")
            x_part = np.empty((len(part), *x.shape[1:]), dtype=x.dtype)
            x_part[by_position] = x[part[by_position]]  # a memory map reads fastest in file order
            batches = (-1, self.batch_size)
            yield (y[part].reshape(batches + (1,)), weight[start:start + rows_per_chunk].reshape(batches + (1,)),
                   *(inputs.reshape(batches + inputs.shape[1:]) for inputs in self._inputs(x_part, width)))

    def _chunked_epoch(self, order: np.ndarray) -> np.ndarray:
        totals = np.zeros(4)
        train_weight, validation_weight = self.chunk_weights
        train_width, validation_width = self.widths
        for chunk in self._chunks(self.data.x_train, self.data.y_train, order, train_weight, train_width):
            totals[:2] += self.train_steps(*chunk).numpy()
        for chunk in self._chunks(self.data.x_validation, self.data.y_validation, self.validation_order,
                                  validation_weight, validation_width):
            totals[2:] += self.validate_steps(*chunk).numpy()
        return totals

    def run(self, epochs: int, callbacks: Sequence) -> dict[str, list[float]]:
        import keras

        model = self.model
        listed = keras.callbacks.CallbackList(list(callbacks), add_history=True, add_progbar=True, model=model,
                                              verbose=2, epochs=epochs, steps=self.steps)
        model.stop_training = False
        rows: dict[str, list[float]] = {}
        listed.on_train_begin()
        for epoch in range(epochs):
            listed.on_epoch_begin(epoch)
            listed.on_train_batch_begin(0)
            order = self._padded(self.rng.permutation(self.train_rows))
            totals = (self._chunked_epoch(order) if self.chunked
                      else self.train_epoch(order).numpy().astype(np.float64))
            logs = {"loss": totals[0] / self.train_rows, "accuracy": totals[1] / self.train_rows}
            listed.on_train_batch_end(self.steps - 1, logs)
            logs.update(val_loss=totals[2] / self.validation_rows, val_accuracy=totals[3] / self.validation_rows)
            listed.on_epoch_end(epoch, logs)
            for name, value in logs.items():
                rows.setdefault(name, []).append(float(value))
            if model.stop_training:
                break
        listed.on_train_end()
        return rows


class Bags:
    """The tutorial's model trained as the bag of words it computes: the same numbers, less work.

    Mean pooling over all positions equals, per review, the sum over its distinct token ids of
    count x embedding row, divided by the sequence length. So a batch is read as each review's distinct
    ids and their counts (about 110 a review here, against 256 positions), and the embedding's gradient
    follows from the pooled vector's: an id's gradient is count x the review's gradient / length.

    The embedding's optimizer step is Keras's Adam step for the gradient Keras produces, which holds one
    slice per position: the first moment moves with the sum of the slices, the second with the sum of
    their squares (count x (gradient / length) squared, which is not the square of the sum). The other
    layers are called and stepped by Keras as usual, so the trained weights are those of the token loop
    up to float rounding. Used only where that holds: Embedding -> GlobalAveragePooling1D -> Dense and
    Dropout layers, Keras's plain Adam, and no regularizers or constraints; otherwise `of` gives None and
    the loop steps the model as Keras does.
    """

    def __init__(self, model):
        self.optimizer = model.optimizer
        self.embedding = model.layers[1].embeddings
        self.head = model.layers[3:]
        self.head_variables = [variable for layer in self.head for variable in layer.trainable_variables]
        self.length = model.layers[1].input.shape[1]
        index = self.optimizer._get_variable_index(self.embedding)
        self.momentum, self.velocity = self.optimizer._momentums[index], self.optimizer._velocities[index]

    @classmethod
    def of(cls, model) -> Optional["Bags"]:
        import keras
        from keras import layers

        kinds = [type(layer) for layer in model.layers]
        optimizer = model.optimizer
        if (len(kinds) < 4 or kinds[:3] != [layers.InputLayer, layers.Embedding, layers.GlobalAveragePooling1D]
                or any(kind not in (layers.Dense, layers.Dropout) for kind in kinds[3:])):
            return None
        embedding, pooling = model.layers[1], model.layers[2]
        if (embedding.mask_zero or pooling.data_format != "channels_last" or embedding.embeddings.dtype != "float32"
                or not embedding.trainable or len(model.inputs) != 1):
            return None
        unset = ("kernel_regularizer", "bias_regularizer", "activity_regularizer", "embeddings_regularizer",
                 "kernel_constraint", "bias_constraint", "embeddings_constraint")
        if any(getattr(layer, name, None) is not None for layer in model.layers for name in unset):
            return None
        if (type(optimizer) is not keras.optimizers.Adam or optimizer.amsgrad or optimizer.weight_decay
                or optimizer.clipnorm or optimizer.clipvalue or optimizer.global_clipnorm or optimizer.use_ema
                or optimizer.gradient_accumulation_steps or optimizer.loss_scale_factor is not None
                or not hasattr(optimizer, "_momentums")):
            return None
        return cls(model)

    @staticmethod
    def distinct(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row of `x` sorted, and where each run of equal ids starts."""
        ordered = np.sort(x, axis=1)
        starts = np.ones(ordered.shape, dtype=bool)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        return ordered, starts

    @classmethod
    def width(cls, x: np.ndarray, rows_per_pass: int = 65536) -> int:
        """The most distinct ids in any row of `x`, read a slice of rows at a time (`x` may be on disk)."""
        return max([int(cls.distinct(x[start:start + rows_per_pass])[1].sum(axis=1).max())
                    for start in range(0, len(x), rows_per_pass)] or [1])

    @classmethod
    def encode(cls, x: np.ndarray, width: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row of token ids as its distinct ids and their counts, in `width` columns (the rows' most
        distinct ids if None); the columns left over hold id 0 with count 0, which adds nothing."""
        ordered, starts = cls.distinct(x)
        runs = starts.sum(axis=1)
        width = width or int(runs.max(initial=1))
        first = np.flatnonzero(starts)  # each run's first position, counted over the whole array
        rows = first // x.shape[1]
        columns = np.arange(len(first)) - np.repeat(np.cumsum(runs) - runs, runs)  # the run's place in its row
        tokens = np.zeros((len(x), width), dtype=np.int32)
        counts = np.zeros((len(x), width), dtype=np.float32)
        tokens[rows, columns] = ordered.reshape(-1)[first]
        counts[rows, columns] = np.diff(first, append=ordered.size)  # each row starts a run: runs end at rows' ends
        return tokens, counts

    def pool(self, tokens, counts):
        """GlobalAveragePooling1D of the embedded sequence, from its bag."""
        import tensorflow as tf

        return tf.reduce_sum(tf.gather(self.embedding, tokens) * counts[..., None], axis=1) / self.length

    def predict(self, tokens, counts, training: bool):
        return self.forward(self.pool(tokens, counts), training)

    def forward(self, pooled, training: bool):
        for layer in self.head:
            pooled = layer(pooled, training=training)
        return pooled

    def train_step(self, tokens, counts, score):
        """One optimizer step on a batch; `score(predicted)` gives (summed loss, right answers, mean loss)."""
        import tensorflow as tf

        pooled = self.pool(tokens, counts)
        with tf.GradientTape() as tape:
            tape.watch(pooled)
            loss_sum, right, batch_loss = score(self.forward(pooled, training=True))
        pooled_gradient, *head_gradients = tape.gradient(batch_loss, [pooled] + self.head_variables)
        self._embedding_step(tokens, counts, pooled_gradient / self.length)  # before Keras counts the step
        self.optimizer.apply_gradients(zip(head_gradients, self.head_variables))
        return loss_sum, right

    def _embedding_step(self, tokens, counts, share):
        """keras.optimizers.Adam.update_step for the embedding, as Keras takes it for the per-position
        gradient slices; `share` is each position's gradient, one row per review."""
        import tensorflow as tf

        optimizer, dtype = self.optimizer, self.embedding.dtype
        ids = tf.reshape(tokens, [-1])
        rows, dim = self.embedding.shape

        def summed(per_review):  # sum over the batch's positions of each id, count x per-review value
            return tf.math.unsorted_segment_sum(tf.reshape(counts[..., None] * per_review[:, None, :], [-1, dim]),
                                                ids, rows)

        gradient, squares = summed(share), summed(tf.square(share))
        learning_rate = tf.cast(optimizer.learning_rate, dtype)
        step = tf.cast(optimizer.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
        alpha = learning_rate * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        self.momentum.assign_add((gradient - self.momentum) * (1 - optimizer.beta_1))
        self.velocity.assign_add((squares - self.velocity) * (1 - optimizer.beta_2))
        self.embedding.assign_sub(self.momentum * alpha / (tf.sqrt(self.velocity) + optimizer.epsilon))
