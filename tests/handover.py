"""What a data worker hands back in tests/test_reliability.py's handover tests: arrays over prepare_ahead.SPILL,
made in the worker (a module of its own, so that the spawned worker imports little), and kept in a stage cache
whose write waits until the run took them."""

from __future__ import annotations

import time
import types

import numpy as np

from pipeline.build import Encoded
from pipeline.speed.cache import StageCache
from pipeline.speed.prepare_ahead import SPILL


def arrays() -> Encoded:
    rows = SPILL // 256 + 1  # just over the threshold, as uint8 rows of 256 ids
    ids = np.tile(np.arange(256, dtype=np.uint8), (rows, 1))
    labels = np.zeros(rows, dtype=np.float32)
    return Encoded(vocabulary=["", "[UNK]"], x_train=ids, y_train=labels, x_validation=ids[:2],
                   y_validation=labels[:2], x_test=ids[:3], y_test=labels[:3])


def big_data(cfg, step):
    return types.SimpleNamespace(encoded=step("vectorize", arrays))


def slow_data(cfg, step):
    """Data that takes a minute to make (a sweep's data worker still working when its sweep ends)."""
    time.sleep(60)


class GatedCache(StageCache):
    """The stage cache keeping vectorize alone, under one key; its write waits (up to 20 s) for the file TAKEN in
    cache_dir, which the test makes once the run has its data: the order of handover and write, observed."""
    TAKEN = "taken"

    def key(self, stage: str) -> str | None:
        return "handover" if stage == "vectorize" else None

    def save(self, stage: str, product) -> None:
        deadline = time.monotonic() + 20
        while not (self.root / self.TAKEN).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        super().save(stage, product)
