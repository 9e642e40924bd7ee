"""The caller's random generators, as a run found them: `with kept(): ...` (train() runs inside it).

A run seeds what it needs from cfg.seed: build and fit call keras.utils.set_random_seed, which seeds the
process's Python `random` (Keras draws each layer's initial weights from it), NumPy's global generator,
TensorFlow's global seed and Keras's own seed generator. When the run ends, each is put back as it was, so
that a notebook's `random.random()`, `np.random.rand()`, `tf.random.uniform(...)` and `keras.random.uniform(...)`
go on with the numbers they would have given had the run not happened. One thing TensorFlow cannot keep: an op
given its own `seed=` starts its sequence again, as after any tf.random.set_seed (its counter lives in a
kernel, which reseeding clears).
"""

from __future__ import annotations

import contextlib
import random
import sys

import numpy as np


@contextlib.contextmanager
def kept():
    python, numpy = random.getstate(), np.random.get_state()
    tensorflow, keras = _tensorflow_seed(), _keras_generators()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        if "tensorflow" in sys.modules:
            from tensorflow.python.eager import context  # (the global seed's home: no public getter)

            seed, state = tensorflow
            context.context()._set_global_seed(seed)  # (None: as never seeded)
            if state is not None:
                context.context()._rng.setstate(state)  # where the next unseeded op's seed comes from
        if "keras" in sys.modules:
            from keras.src.backend.common import global_state

            for name, value in keras.items():
                global_state.set_global_attribute(name, value)


def _tensorflow_seed() -> tuple[int | None, object]:
    """TensorFlow's global seed and the state of the generator it derives op seeds from (None, None before
    TensorFlow is imported, or while nothing has seeded it)."""
    if "tensorflow" not in sys.modules:
        return None, None
    from tensorflow.python.eager import context

    rng = getattr(context.context(), "_rng", None)
    return context.global_seed(), (rng.getstate() if rng is not None else None)


def _keras_generators() -> dict[str, object]:
    """Keras's global seed (keras.utils.set_random_seed) and the generator keras.random draws from without one."""
    from_keras = {"global_random_seed": None, "global_seed_generator": None}  # (rng_utils, seed_generator)
    if "keras" in sys.modules:
        from keras.src.backend.common import global_state

        from_keras = {name: global_state.get_global_attribute(name) for name in from_keras}
    return from_keras
