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

SHARE = 0.4  # the share a fix suggests: the tutorial's 10,000 of 25,000 (conf/split/fraction.yaml)


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
        raise ValueError(too_many(count, cfg, size))
    order = np.random.default_rng(seed).permutation(count) if cfg.shuffle else np.arange(count)
    return order, size


def too_many(count: int, cfg: SplitConfig, size: int) -> str:
    """Why a hold-out of `size` of `count` training reviews cannot be, and a fix that works when added to
    the command as written (a later override of the same key wins)."""
    if count < 2:
        return (f"the training split has {count} review(s): too few to hold out any for validation; "
                "give more rows, or fewer to the test split (ingest.test_fraction for a table)")
    share = f"split.validation_size=null split.validation_fraction={SHARE}"
    if cfg.validation_size is not None:
        return (f"split.validation_size={size} leaves no training data: the training split has {count} reviews; "
                f"hold out fewer, e.g. split.validation_size={min(max(1, round(SHARE * count)), count - 1)}, "
                f"or a share of them: {share}")
    return (f"split.validation_fraction={cfg.validation_fraction} holds out {size} of the training split's "
            f"{count} reviews; it must leave some for both validation and training, e.g. "
            f"split.validation_fraction={SHARE}")


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
