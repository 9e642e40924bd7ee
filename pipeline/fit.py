"""Stage 4, fit: train the built model, one history row per epoch.

In: a compiled model, the Encoded arrays, a FitConfig, the seed and extra Keras callbacks (the tracked
run passes one that records each epoch as it ends). Out: Fitted, the per-epoch history as a table
(epoch 1..N), with early stopping the epoch it stopped at and the best epoch whose weights were kept,
and, in memory, the weights of the epoch where fit.early_stopping.monitor was best (the "best"
checkpoint, early stopping on or off) and of every fit.checkpoint_every-th epoch. fit.loop=keras
trains with model.fit as the tutorial does; fit.loop=epoch (the default) with pipeline.epochloop, the
same steps in one compiled call an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pandas as pd

from pipeline.config import FitConfig

log = logging.getLogger(__name__)
XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


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


def fit(model, data, cfg: FitConfig, seed: int, callbacks: Sequence = ()) -> Fitted:
    """Train `model` in place on the training arrays, validating on the held-out arrays each epoch."""
    import keras

    from pipeline.epochloop import EpochLoop

    keras.utils.set_random_seed(seed)
    stopper = None
    keeper = _keeper(cfg.early_stopping.monitor, cfg.checkpoint_every)
    every = [*callbacks, keeper]
    if cfg.early_stopping.enabled:
        stopper = keras.callbacks.EarlyStopping(
            monitor=cfg.early_stopping.monitor, patience=cfg.early_stopping.patience,
            restore_best_weights=cfg.early_stopping.restore_best_weights, verbose=1)
        every.insert(0, stopper)
    if cfg.loop == "epoch" and keras.backend.backend() == "tensorflow":
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


@contextmanager
def compile_cache(cache_dir: str) -> Iterator[Path | None]:
    """Inside, XLA's persistent compilation cache (a TensorFlow flag in TF_XLA_FLAGS) is
    `cache_dir`/xla/<kind of machine>: a run whose compiled programs were built before loads them instead
    of compiling. The files are machine code, so the folder is named for the TensorFlow version and the
    CPU's features. TensorFlow reads the flag once, at its first compilation, so it must be set before that
    and stays in force for the process; the environment variable is put back as it was at the end. A flag
    the user set wins; once TensorFlow has started, nothing changes."""
    flags = os.environ.get("TF_XLA_FLAGS")
    folder = None if XLA_CACHE_FLAG in (flags or "") or "tensorflow" in sys.modules else _cache_folder(cache_dir)
    if folder is not None:
        os.environ["TF_XLA_FLAGS"] = f"{flags or ''} {XLA_CACHE_FLAG}={folder}".strip()
    try:
        yield folder
    finally:
        if folder is not None:
            if flags is None:
                os.environ.pop("TF_XLA_FLAGS", None)
            else:
                os.environ["TF_XLA_FLAGS"] = flags


def _cache_folder(cache_dir: str) -> Path | None:
    kind = [platform.machine(), _cpuinfo(("flags", "Features")) or platform.processor()]
    for package in ("tensorflow-cpu", "tensorflow"):
        try:
            kind.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    folder = (Path(cache_dir) / "xla" / hashlib.sha256("\n".join(kind).encode()).hexdigest()[:16]).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.debug("no XLA compilation cache (%s)", error)
        return None
    return folder


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
    name = _cpuinfo(("model name",)).split(":", 1)[-1].strip()
    return {"device": "CPU", "device.name": name or platform.processor() or platform.machine()}


def _cpuinfo(prefixes: tuple[str, ...]) -> str:
    """The first line of /proc/cpuinfo that starts with one of `prefixes` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line for line in handle if line.startswith(prefixes)), "")
    except OSError:
        return ""
