"""What a data worker hands back in tests/test_reliability.py's handover test: arrays over prepare_ahead.SPILL,
made in the worker (a module of its own, so that the spawned worker imports little)."""

from __future__ import annotations

import types

import numpy as np

from pipeline.build import Encoded
from pipeline.speed.prepare_ahead import SPILL


def big_data(cfg, step):
    rows = SPILL // 256 + 1  # just over the threshold, as uint8 rows of 256 ids
    ids = np.tile(np.arange(256, dtype=np.uint8), (rows, 1))
    labels = np.zeros(rows, dtype=np.float32)
    return types.SimpleNamespace(encoded=Encoded(vocabulary=["", "[UNK]"], x_train=ids, y_train=labels,
                                                 x_validation=ids[:2], y_validation=labels[:2],
                                                 x_test=ids[:3], y_test=labels[:3]))
