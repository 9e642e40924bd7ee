"""Each stage's call as train.py makes it: timed, told and, for the data stages, through the stage cache.

`step(name, stage_function, *args)` returns what stage_function(*args) returns, and keeps its seconds
(the run's `seconds.<name>` tags) and one terminal line: the stage, its seconds, what it made (WORDS).
With stage_cache=true, ingest's and vectorize's products are read from the stage cache when the same
settings, inputs and code made them before (pipeline/speed/cache.py), and kept there when not (jobs side by
side that miss the same entry: one makes it, the others wait for it and read it); `cache` says which were
hits. In the data worker (prepare_ahead) a missed entry is written after the data is handed over (`write_later`,
then `write_kept`), its lock held until then. This is the one place that times a stage or writes its line.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.console import stage as show


def _reviews(reviews) -> str:
    meta = reviews.meta()
    left_out = f", {len(meta['skipped'])} left out (see data/skipped_rows.csv)" if meta["skipped"] else ""
    return f"{sum(meta['counts'].values()):,} reviews from {Path(meta['source']).name}{left_out}"


def _tokens(encoded) -> str:
    kind = f"{len(encoded.codes):,} n-grams" if encoded.ngrams else f"{len(encoded.vocabulary):,} tokens"
    return f"{kind}, {encoded.x_train.shape[1]} a review"


def _fitted(fitted) -> str:
    done = fitted.summary()
    epochs = done["epochs_trained"]
    return (f"{epochs} epoch{'s' * (epochs != 1)}, lowest val_loss {done['best_val_loss']:.4f} "
            f"at epoch {done['best_val_loss_epoch']}")


def _logged(uri, model, encoded, cfg, kept) -> str:
    return (f"{kept.served.role} (epoch {kept.served.epoch}) as the raw-text model, served as it was tested; "
            f"{1 + bool(kept.other) + len(kept.every)} checkpoint(s)")


# What each stage's line says it made: a function of its product (and the call's arguments).
WORDS = {
    "ingest": lambda reviews, *args: _reviews(reviews),
    "split": lambda parts, *args: ", ".join(f"{count:,} {name}" for name, count in parts.sizes().items()),
    "vectorize": lambda encoded, *args: _tokens(encoded),
    "build": lambda model, *args: f"{model.count_params():,} parameters",
    "fit": lambda fitted, *args: _fitted(fitted),
    "evaluate": lambda kept, *args: kept.line(),
    "log_model": _logged,
}
LABELS = {"start_tensorflow": "start TensorFlow"}  # a line's stage, where it is not the name its seconds are kept under


class Steps:
    def __init__(self, cfg: PipelineConfig, store, tell: bool = True, write_later: bool = False):
        self.cfg, self.store = cfg, store  # the stage cache (pipeline.speed.stage_cache), keeping ingest and vectorize
        self.tell = tell  # False in the worker that prepares the data ahead: its lines are told when taken
        self.seconds: dict[str, float] = {}
        self.cache: dict[str, str] = {}  # ingest, vectorize: hit, miss, or off
        self.lines: list[tuple[str, float, str]] = []
        # True in the data worker: a missed entry is kept here with its lock held, and written by write_kept()
        self.write_later, self.unwritten = write_later, []  # (stage, product, its lock's ExitStack)

    def __getstate__(self) -> dict:  # (the worker hands its Steps over before writing: no products, no locks)
        return {**self.__dict__, "unwritten": []}

    def __call__(self, name: str, function, *args, **kwargs):
        start = time.perf_counter()
        kept = self.store.key(name) is not None  # a stage the cache keeps
        with ExitStack() as held:
            try:  # (a stage that fails or is interrupted still has its seconds, up to then)
                product = self.store.load(name) if kept else None
                if product is None and kept and self.store.on:  # a miss: jobs side by side that miss it make it once
                    held.enter_context(self.store.building(name))
                    product = self.store.load(name)  # (made meanwhile by the job that held the lock)
                hit = product is not None
                if not hit:
                    product = function(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + took
            if kept:
                self.cache[name] = "hit" if hit else "miss" if self.store.on else "off"
            if kept and not hit and self.store.on:
                if self.write_later:  # the entry's lock goes with it: jobs that miss it meanwhile wait for it
                    self.unwritten.append((name, product, held.pop_all()))
                else:
                    self.keep(name, product)
        words = WORDS.get(name, lambda *_: "")(product, *args)
        self.line(LABELS.get(name, name), took, words + (", from the stage cache" if hit else ""))
        return product

    def keep(self, name: str, product) -> None:
        began = time.perf_counter()
        self.store.save(name, product)
        self.seconds["cache_write"] = self.seconds.get("cache_write", 0.0) + time.perf_counter() - began

    def write_kept(self) -> None:
        """Write the entries kept for later (write_later), in the order they were made, each lock let go once its
        entry is in place (or, should a write fail or be interrupted, on the way out: never a partial entry)."""
        unwritten, self.unwritten = self.unwritten, []
        with ExitStack() as locks:
            for _, _, lock in unwritten:
                locks.push(lock)  # (each let go once: on its entry's write, or here on the way out)
            for name, product, lock in unwritten:
                with lock:
                    self.keep(name, product)

    def line(self, name: str, seconds: float, words: str) -> None:
        self.lines.append((name, seconds, words))
        if self.tell:
            show(name, seconds, words)

    def quiet(self) -> "Steps":
        """A fresh Steps for the data worker (pipeline/speed/prepare_ahead.py): it keeps its lines to itself, and the
        stage cache's entries it makes for after the handover."""
        return Steps(self.cfg, self.store, tell=False, write_later=True)

    def taken(self, other: "Steps") -> None:
        """Adopt what the data worker's Steps did (pipeline/speed/prepare_ahead.py): its seconds, hits, and lines, told now."""
        self.seconds.update(other.seconds)
        self.cache.update(other.cache)
        for line in other.lines:
            self.line(*line)
