"""Keras's fit, one compiled call per epoch (fit.loop=epoch): the same model, loss, optimizer and batches.

Why: an epoch's arithmetic is tiny (an embedding lookup and two small layers), so model.fit's machinery
(fresh tf.data iterators, a call per batch) costs more than the work. Here the arrays are tensors and
an epoch's training steps, then its validation pass, run in one XLA program (public APIs only: the
model's call and loss and `optimizer.apply_gradients` inside `tf.function`). The last, short batch is
padded with zero-weight rows, so its loss and gradient are the real rows', as in Keras; rows are
reshuffled every epoch from the seed; batch callbacks run once an epoch (as with
`steps_per_execution`), epoch callbacks as in model.fit. tests/test_stages.py checks that both loops
give the same curves and weights.

fit.dense_gradients (on by default) hands the optimizer each embedding's gradient summed per row, as a
dense tensor (`tf.convert_to_tensor`), instead of Keras's sparse one (a row per token occurrence). Two
things follow. Speed: Keras 3's Adam turns that sparse gradient dense twice a step (keras-team/keras
#19992), which takes about 40% of an epoch here. Arithmetic: for a token repeated within a batch, Adam's
second moment then sees the square of its summed gradient, as Adam's definition and TensorFlow 2's own
optimizers (which summed repeated indices first) have it; Keras 3's sparse path adds the square of each
occurrence. Both settings agree exactly where no token repeats within a batch (tests/test_stages.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class EpochLoop:
    def __init__(self, model, data, batch_size: int, jit_compile: bool, seed: int, dense_gradients: bool = True):
        import keras
        import tensorflow as tf

        self.model, self.batch_size, self.dense_gradients = model, batch_size, dense_gradients
        self.rng = np.random.default_rng(seed)  # each epoch's shuffle
        self.train_rows, self.validation_rows = len(data.x_train), len(data.x_validation)
        self.steps = self._whole(self.train_rows) // batch_size
        self.loss = keras.losses.get(model.loss)  # per-example losses; weighted and reduced below
        model.optimizer.build(model.trainable_variables)
        self.x_train = tf.constant(data.x_train)
        self.y_train = tf.constant(data.y_train.reshape(-1, 1))
        self.train_weight = tf.constant(self._weight(self.train_rows))
        order = self._padded(np.arange(self.validation_rows))
        batches = (-1, batch_size)
        self.validation = [tf.constant(part.reshape(batches + part.shape[1:])) for part in (
            data.x_validation[order], data.y_validation[order].reshape(-1, 1), self._weight(self.validation_rows))]
        # autograph off: the loops are written as tf.while_loop, and converting the code costs tracing time
        self.train_epoch = tf.function(self._train_epoch, jit_compile=jit_compile, autograph=False)

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

    def _steps(self, x, y, weight, training: bool):
        """One pass over batches of x, y and weight (each shaped (steps, batch, ...)): a training step on
        each, or scores only. Returns the summed loss and count of right answers, as [loss, right]."""
        import tensorflow as tf

        variables = self.model.trainable_variables

        def scores(batch_x, batch_y, batch_weight):
            with tf.GradientTape() as tape:
                predicted = self.model(batch_x, training=training)
                row_weight = tf.reshape(batch_weight, [-1])
                per_row = tf.reshape(self.loss(batch_y, predicted), [-1]) * row_weight
                rows = tf.reduce_sum(row_weight)
                batch_loss = tf.reduce_sum(per_row) / rows
                if self.model.losses:  # layer regularizers, added as Keras adds them
                    batch_loss += tf.add_n(self.model.losses)
            if training:
                gradients = tape.gradient(batch_loss, variables)
                if self.dense_gradients:  # an embedding's rows summed, not one row per occurrence
                    gradients = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in gradients]
                self.model.optimizer.apply_gradients(zip(gradients, variables))
            right = tf.cast(tf.equal(tf.cast(predicted > 0.5, batch_y.dtype), batch_y), tf.float32)  # binary_accuracy
            return tf.stack([batch_loss * rows, tf.reduce_sum(right * batch_weight)])

        def step(index, totals):
            return index + 1, totals + scores(x[index], y[index], weight[index])

        _, totals = tf.while_loop(lambda index, _: index < y.shape[0], step, (0, tf.zeros([2])))
        return totals

    def _train_epoch(self, order):
        import tensorflow as tf

        shape = (self.steps, self.batch_size)
        x = tf.reshape(tf.gather(self.x_train, order), shape + tuple(self.x_train.shape[1:]))
        y = tf.reshape(tf.gather(self.y_train, order), shape + (1,))
        weight = tf.reshape(self.train_weight, shape + (1,))
        return tf.concat([self._steps(x, y, weight, True), self._steps(*self.validation, False)], 0)

    def run(self, epochs: int, callbacks: Sequence) -> dict[str, list[float]]:
        """Train for `epochs` (or until a callback stops it); the history, as model.fit's History has it."""
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
            totals = self.train_epoch(self._padded(self.rng.permutation(self.train_rows))).numpy().astype(np.float64)
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
