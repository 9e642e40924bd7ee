"""The speed mechanisms, each behind its switch and imported only when that switch is on.

switch               what it does                                                    module
prepare_ahead        the data stages run in a worker process while TensorFlow loads   prepare_ahead.py
stage_cache          ingest's and vectorize's products reused from cache_dir         cache.py
fit.compile_cache    XLA's compiled programs reused from cache_dir                   xla.py
fit.loop=epoch       one compiled call per epoch instead of model.fit's per batch     ../epochloop.py
fit.dense_gradients  Adam gets the embedding's gradient summed per row               ../epochloop.py
freeze_gc            the command line's gc paused while the libraries import         collection.py (__main__)

(The epoch loop sits beside fit.py, the stage that imports it when fit.loop=epoch: the stages import nothing
above them.) Each is measured switched off by `python benchmarks/bench.py --ablate` (docs/performance.md), and a
parity test shows the numbers are the same with it off. The run's story (pipeline/train.py) reads the same
either way.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

CACHED_STAGES = ("ingest", "vectorize")  # what stage_cache keeps (split takes a hundredth of a second)


class NoStageCache:
    """stage_cache=false: the stages it would keep are made every time (their cache tag says "off")."""
    on = False

    def key(self, stage: str) -> str | None:
        return "off" if stage in CACHED_STAGES else None

    def load(self, stage: str) -> None:
        return None

    def save(self, stage: str, product) -> None:
        pass


def stage_cache(cfg):
    """The run's stage cache: cache.StageCache, or NoStageCache with stage_cache=false."""
    if not cfg.stage_cache:
        return NoStageCache()
    from pipeline.speed.cache import StageCache

    return StageCache(cfg)


def xla_cache(cfg):
    """A context inside which XLA keeps its compiled programs in cache_dir (fit.compile_cache, with jit_compile)."""
    if not (cfg.fit.jit_compile and cfg.fit.compile_cache):
        return nullcontext()
    from pipeline.speed.xla import compile_cache

    return compile_cache(cfg.cache_dir)


class Handover:
    """What `ahead` yields. Called: the prepared data. `written()`, at the run's end: waits until the stage cache
    holds the entries the data's making missed (the data worker writes them after handing the data over)."""

    def __init__(self, take, written=lambda: None):
        self.take, self.written = take, written

    def __call__(self):
        return self.take()


@contextmanager
def ahead(cfg, prepare, step):
    """Yields a Handover whose call returns prepare(cfg, step): made in a worker process started now
    (prepare_ahead, see prepare_ahead.py), or here when it is called."""
    if cfg.prepare_ahead:
        from pipeline.speed import prepare_ahead as worker

        if worker.can_start(cfg):
            with worker.started(cfg, prepare, step) as prepared:
                yield prepared
            return
    yield Handover(lambda: prepare(cfg, step))
