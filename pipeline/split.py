"""Stage 2, split: hold out validation reviews from the training split, as the tutorial does.

In: the reviews table (ingest's Reviews.frame), a SplitConfig and the run's seed. Out: Splits, three tables (train,
validation, test). Validation is taken from a seeded shuffle of the training split; the test split is
passed through untouched and is read by nothing before evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import SplitConfig


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def holdout(count: int, cfg: SplitConfig, seed: int) -> tuple[np.ndarray, int]:
    """The training reviews' order (positions 0..count-1, shuffled with the seed unless
    split.shuffle=false) and how many of the first are held out for validation."""
    size = cfg.validation_size if cfg.validation_size is not None else int(round(cfg.validation_fraction * count))
    if not 0 < size < count:
        raise ValueError(f"split.validation_size={size} leaves no training data: the training split has "
                         f"{count} reviews; hold out fewer (e.g. split.validation_fraction=0.4)")
    order = np.random.default_rng(seed).permutation(count) if cfg.shuffle else np.arange(count)
    return order, size


def split(frame: pd.DataFrame, cfg: SplitConfig, seed: int) -> Splits:
    """Hold out `validation_size` reviews (or `validation_fraction` of them) from the training split of
    `frame` (columns text, label, rating, split)."""
    train = frame[frame["split"] == "train"]
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    order, size = holdout(len(train), cfg, seed if cfg.seed is None else cfg.seed)
    train = train.iloc[order].reset_index(drop=True)
    # like the tutorial: the first `size` (shuffled) training reviews are the validation set
    return Splits(train=train.iloc[size:].reset_index(drop=True),
                  validation=train.iloc[:size].reset_index(drop=True), test=test)
