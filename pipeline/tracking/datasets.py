"""The reviews as an MLflow dataset input, and its registration when parallel jobs register it at once."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

log = logging.getLogger(__name__)


class ReviewsDataset(MetaDataset):
    """The reviews as MLflow shows them: where they came from, a digest of their content and source, and row counts.
    MLflow keeps one data set per name and digest in an experiment, with the source it was first logged with: the
    same rows read from another file (a table's CSV, then its Parquet) would name the first file. So the digest
    covers the source too; the content's own digest is the run's tag data.digest."""

    def __init__(self, source: str, digest: str, counts: dict[str, int]):
        try:
            with warnings.catch_warnings():  # a local path matches two equivalent MLflow source types
                warnings.simplefilter("ignore", UserWarning)
                resolved = resolve_dataset_source(str(Path(source).resolve()) if Path(source).exists() else source)
        except Exception:  # not a path or URI MLflow knows (keras.datasets.imdb): a code source
            from mlflow.data.code_dataset_source import CodeDatasetSource

            resolved = CodeDatasetSource(tags={"source": source})
        self._counts = counts
        of_both = hashlib.sha256(f"{digest}\n{resolved.to_json()}".encode()).hexdigest()
        super().__init__(source=resolved, name="imdb-reviews", digest=of_both[:20])

    @property
    def profile(self) -> dict[str, int]:
        """Its rows, and those of each of the source's own parts (`source_train_rows`: the part the validation rows
        are held out of, not the run's param `data.train_rows`, what was left to train on)."""
        return {"num_rows": sum(self._counts.values()), **{f"source_{k}_rows": v for k, v in self._counts.items()}}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def registering(call, attempts: int = 3):
    """`call()`, which registers a data set first thing. Jobs of a parallel sweep register the same data
    set at the same moment; a server's SQL store checks for the row, then inserts it, and refuses the
    second insert. On the next try the row exists and is linked instead."""
    for attempt in range(attempts):
        try:
            return call()
        except mlflow.exceptions.MlflowException as error:
            if "unique constraint" not in str(error).lower() or attempt == attempts - 1:
                raise
            log.info("another job registered the same data set at the same moment; linking it instead")
            time.sleep(0.2 * (attempt + 1))
