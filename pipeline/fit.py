"""Stage 4, fit: train the built model, one history row per epoch.

In: a compiled model, Encoded arrays, a FitConfig and extra Keras callbacks (the tracking module
passes one that logs each epoch as it ends). Out: Fitted, the per-epoch history as a table (epoch 1..N)
and, with early stopping, the epoch it stopped at and the best epoch whose weights were kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pandas as pd

from pipeline.build import Encoded
from pipeline.config import FitConfig


@dataclass
class Fitted:
    history: pd.DataFrame  # columns epoch, loss, accuracy, val_loss, val_accuracy
    stopped_epoch: Optional[int]  # last epoch trained when early stopping ended the fit
    best_epoch: Optional[int]  # the epoch whose weights the model holds after early stopping


def fit(model, data: Encoded, cfg: FitConfig, seed: int, callbacks: Sequence = ()) -> Fitted:
    """Train `model` in place on the training arrays, validating on the held-out arrays each epoch."""
    import keras

    keras.utils.set_random_seed(seed)
    # How the steps run, not what they compute: read by Keras when fit builds its train function.
    model.jit_compile = cfg.jit_compile
    model.steps_per_execution = cfg.steps_per_execution
    stopper = None
    all_callbacks = list(callbacks)
    if cfg.early_stopping.enabled:
        stopper = keras.callbacks.EarlyStopping(
            monitor=cfg.early_stopping.monitor, patience=cfg.early_stopping.patience,
            restore_best_weights=cfg.early_stopping.restore_best_weights, verbose=1)
        all_callbacks.insert(0, stopper)
    history = model.fit(data.x_train, data.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        validation_data=(data.x_validation, data.y_validation), callbacks=all_callbacks,
                        verbose=2)
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", range(1, len(table) + 1))
    stopped = best = None
    if stopper is not None:
        stopped = len(table) if stopper.stopped_epoch else None
        column = table[cfg.early_stopping.monitor]
        best = int(table["epoch"][column.idxmin() if "loss" in cfg.early_stopping.monitor else column.idxmax()])
    return Fitted(history=table, stopped_epoch=stopped, best_epoch=best)
