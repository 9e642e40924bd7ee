"""Stage 4, fit: train the built model, one history row per epoch.

In: a compiled model, the Encoded arrays, a FitConfig, the seed and extra Keras callbacks (the tracked
run passes one that records each epoch as it ends). Out: Fitted, the per-epoch history as a table
(epoch 1..N), with early stopping the epoch it stopped at and the best epoch whose weights were kept,
and, in memory, the weights of the epoch where fit.early_stopping.monitor was best (the "best"
checkpoint, early stopping on or off) and of every fit.checkpoint_every-th epoch. fit.loop=keras
trains with model.fit as the tutorial does; fit.loop=epoch (the default) with pipeline/epochloop.py, the
same steps in one compiled call an epoch.
"""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pandas as pd

from pipeline.config import EarlyStoppingConfig, FitConfig

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    history: pd.DataFrame  # columns epoch, loss, accuracy, val_loss, val_accuracy
    stopped_epoch: Optional[int]  # last epoch trained when early stopping ended the fit
    best_epoch: Optional[int]  # the epoch whose weights the model holds after early stopping
    final_epoch: int = 0  # the epoch whose weights the model holds now (early stopping may have restored the best)
    kept: dict[int, list] = field(default_factory=dict)  # epoch -> model.get_weights(): the best, every N-th
    kept_best: Optional[int] = None  # which of `kept` is the best by fit.early_stopping.monitor

    def summary(self) -> dict[str, float]:
        """epochs_trained, best_val_loss and the epoch it was reached (and stopped_epoch, best_epoch with
        early stopping): what the run records and the terminal reports."""
        lowest = self.history.loc[self.history["val_loss"].idxmin()]
        summary = {"epochs_trained": len(self.history), "best_val_loss": float(lowest["val_loss"]),
                   "best_val_loss_epoch": int(lowest["epoch"])}
        summary.update({k: v for k, v in (("stopped_epoch", self.stopped_epoch), ("best_epoch", self.best_epoch))
                        if v is not None})
        return summary


def fit(model, data, cfg: FitConfig, seed: int, callbacks: Sequence = (), budgets: Sequence[int] = (),
        reached: Optional[Callable[[Fitted], None]] = None, stopping: Optional[tuple] = None) -> Fitted:
    """Train `model` in place on the training arrays, validating on the held-out arrays each epoch. At the end of
    each epoch in `budgets` (shorter than cfg.epochs), `reached` gets the Fitted a fit of that many epochs gives
    (the model holds that epoch's weights; it must hold them again when `reached` returns). `stopping`: (an
    EarlyStoppingConfig, a number of epochs, a function): at the epoch where Keras's early stopping with those settings
    would end a fit of that many epochs (here it stops nothing), the function gets (that fit's Fitted, the weights
    Keras would leave the model holding: the best, restored, or None: the current)."""
    import keras

    keras.utils.set_random_seed(seed)
    stopper = None
    keeper = _keeper(cfg.early_stopping.monitor, cfg.checkpoint_every)
    every = [*callbacks, keeper] + ([_budgets(keeper, budgets, reached, stopping)] if budgets or stopping else [])
    if cfg.early_stopping.enabled:
        stopper = _stopper(cfg.early_stopping, verbose=1)
        every.insert(0, stopper)
    if cfg.loop == "epoch" and keras.backend.backend() == "tensorflow":
        from pipeline.epochloop import EpochLoop  # (a speed switch: imported only when on)

        rows = EpochLoop(model, data, cfg.batch_size, cfg.jit_compile, seed, cfg.dense_gradients).run(cfg.epochs, every)
    else:
        if cfg.loop == "epoch":
            log.warning("fit.loop=epoch needs Keras's TensorFlow backend, not %s: using fit.loop=keras",
                        keras.backend.backend())
        model.jit_compile = cfg.jit_compile  # read by Keras when fit builds its train function
        rows = model.fit(data.x_train, data.y_train, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         validation_data=(data.x_validation, data.y_validation), callbacks=every,
                         verbose=2).history
    table = pd.DataFrame(rows)
    table.insert(0, "epoch", range(1, len(table) + 1))
    stopped = best = None
    if stopper is not None:  # the best epoch by the monitor is the one the keeper kept (the earlier of a tie)
        stopped, best = (len(table) if stopper.stopped_epoch else None), keeper.best_epoch
    restored = stopper is not None and cfg.early_stopping.restore_best_weights  # Keras restores at train end
    return Fitted(history=table, stopped_epoch=stopped, best_epoch=best, final_epoch=best if restored else len(table),
                  kept=keeper.kept, kept_best=keeper.best_epoch)


def _stopper(cfg: EarlyStoppingConfig, verbose: int):
    import keras

    return keras.callbacks.EarlyStopping(monitor=cfg.monitor, patience=cfg.patience,
                                         restore_best_weights=cfg.restore_best_weights, verbose=verbose)


class _Unstopped:
    """The model as an EarlyStopping that stops nothing sees it: the model's own, but for `stop_training`."""

    def __init__(self, model):
        self.stop_training, self.watched = False, model

    def __getattr__(self, name):
        return getattr(self.watched, name)


def _budgets(keeper, budgets: Sequence[int], reached: Callable[[Fitted], None], stopping: Optional[tuple]):
    """A Keras callback, after the keeper: at the end of each epoch in `budgets`, the Fitted of a fit that ends
    there (no early stopping: sharing a training falls back to separate ones with it, pipeline/budgets.py); with
    `stopping`, Keras's own EarlyStopping watches the epochs (stopping nothing) for the fit it would have ended."""
    import keras

    class Budgets(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []  # each epoch's logs, as model.fit's History (and EpochLoop's rows) keep them
            self.stopper = None

        def on_train_begin(self, logs=None):
            if stopping:
                self.stopper = _stopper(stopping[0], verbose=0)
                self.stopper.set_model(_Unstopped(self.model))
                self.stopper.on_train_begin(logs)

        def on_epoch_end(self, epoch, logs=None):
            self.rows.append({key: float(value) for key, value in (logs or {}).items()})
            table = pd.DataFrame(self.rows)
            table.insert(0, "epoch", range(1, len(table) + 1))
            if epoch + 1 in budgets:
                reached(Fitted(history=table, stopped_epoch=None, best_epoch=None, final_epoch=epoch + 1,
                               kept=dict(keeper.kept), kept_best=keeper.best_epoch))
            if self.stopper is not None:  # as fit() records an early-stopped fit (the stopper before the keeper)
                self.stopper.on_epoch_end(epoch, logs)
                if self.stopper.model.stop_training or epoch + 1 == stopping[1]:
                    settings, stopper, self.stopper = stopping[0], self.stopper, None
                    restored = settings.restore_best_weights and stopper.best_weights is not None
                    stopping[2](Fitted(history=table, stopped_epoch=epoch + 1 if stopper.stopped_epoch else None,
                                       best_epoch=keeper.best_epoch, kept=dict(keeper.kept), kept_best=keeper.best_epoch,
                                       final_epoch=keeper.best_epoch if settings.restore_best_weights else epoch + 1),
                                stopper.best_weights if restored else None)

    return Budgets()


def _keeper(monitor: str, every: int):
    """A Keras callback that copies the model's weights (in memory) at the end of each epoch where
    `monitor` improves (lower loss, higher accuracy, as EarlyStopping judges it; the earlier epoch wins
    a tie), and every `every`-th epoch; model.fit and EpochLoop both call on_epoch_end with the logs.
    A superseded best is dropped unless it is an every-N-th epoch."""
    import keras

    better = (lambda new, old: new < old) if "loss" in monitor else (lambda new, old: new > old)

    class KeepWeights(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.kept: dict[int, list] = {}
            self.best_epoch, self.best = None, None

        def on_epoch_end(self, epoch, logs=None):
            number, value = epoch + 1, (logs or {}).get(monitor)
            wanted = every > 0 and number % every == 0
            improved = value is not None and (self.best is None or better(value, self.best))
            if improved:
                if self.best_epoch is not None and not (every > 0 and self.best_epoch % every == 0):
                    self.kept.pop(self.best_epoch, None)
                self.best_epoch, self.best = number, value
            if improved or wanted:
                self.kept[number] = self.model.get_weights()

    return KeepWeights()


def device() -> dict[str, str]:
    """Where this process trains, as the run's tags: `device` (GPU:0 or CPU) and `device.name`. A machine
    whose NVIDIA GPU TensorFlow does not see (tensorflow-cpu installed, or no CUDA) gets a warning."""
    import tensorflow as tf

    if gpus := tf.config.list_physical_devices("GPU"):
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
        return {"device": "GPU:0", "device.name": name}
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
        if listed:
            log.warning("this machine has a GPU (%s) but TensorFlow trains on the CPU: install the gpu extra "
                        "(docs/performance.md, 'On a GPU')", listed.splitlines()[0])
    name = cpuinfo(("model name",)).split(":", 1)[-1].strip()
    return {"device": "CPU", "device.name": name or platform.processor() or platform.machine()}


def cpuinfo(prefixes: tuple[str, ...]) -> str:
    """The first line of /proc/cpuinfo that starts with one of `prefixes` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line for line in handle if line.startswith(prefixes)), "")
    except OSError:
        return ""
