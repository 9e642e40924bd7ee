"""The data stages through the stage cache: ingest -> split -> vectorize, or their products from disk.

`prepare(cfg)` runs the data stages as far as cfg.stages goes and returns Prepared. With
stage_cache=true (the default) their products are kept on disk between runs and reused.

An entry lives in `<cache_dir>/<stage>/<key>/`, where the key hashes the stage's settings, the
identity of its inputs and the source code of the modules that made it, so a changed input, setting or
code never reuses a stale product. Every file's sha256 is in `manifest.json`, written last into a
temporary folder that is then renamed into place: a partial or corrupted entry fails verification and
is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from pipeline import build, ingest, split, textmodel
from pipeline.build import Encoded
from pipeline.config import BAG_FAMILIES, PipelineConfig
from pipeline.ingest import sha256_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
INGEST_KEY_SKIPS = ("path", "url", "sha256", "download")  # where a copy lives is not what it holds


def make_key(stage: str, settings: Any, modules: Iterable[Any]) -> str:
    """A key for `stage`'s product made with `settings` by the code of `modules`."""
    code = hashlib.sha256()
    for module in modules:
        code.update(Path(module.__file__).read_bytes())
    text = json.dumps({"stage": stage, "settings": settings, "code": code.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StageCache:
    """Products are dicts of named numpy arrays and pandas DataFrames, plus a small JSON `meta`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> tuple[dict[str, Any], dict] | None:
        """(product, meta) when a complete, verified entry exists; otherwise None (a broken one is removed)."""
        folder = self.entry(stage, key)
        if not folder.exists():
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            product = {}
            for name, info in manifest["files"].items():
                path = folder / info["file"]
                if sha256_file(path) != info["sha256"]:
                    raise ValueError(f"{path} does not match its checksum")
                product[name] = (pd.read_parquet(path) if info["kind"] == "frame"
                                 else np.load(path, allow_pickle=False))
            return product, manifest["meta"]
        except (OSError, ValueError, KeyError) as error:
            log.warning("%s: cache entry %s is damaged (%s); rebuilding it", stage, folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def save(self, stage: str, key: str, product: dict[str, Any], meta: dict) -> None:
        """Write `product` and `meta` into a staging folder, then move it into place."""
        folder = self.entry(stage, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))
        try:
            files = {}
            for name, value in product.items():
                if isinstance(value, pd.DataFrame):
                    file, kind = f"{name}.parquet", "frame"
                    value.to_parquet(staging / file, index=False)
                else:
                    file, kind = f"{name}.npy", "array"
                    np.save(staging / file, np.asarray(value), allow_pickle=False)
                files[name] = {"file": file, "kind": kind, "sha256": sha256_file(staging / file)}
            (staging / MANIFEST).write_text(json.dumps({"files": files, "meta": meta}, indent=1))
            try:
                os.rename(staging, folder)
            except OSError:  # another process finished the same entry first; theirs is as good
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Prepared:
    """What the data stages made, and how: the arrays (None when cfg.stages stops before build), the
    reviews' source, digest and counts, split sizes, cache hit or miss per stage, seconds per stage."""
    encoded: Optional[Encoded]
    ingest_meta: dict
    sizes: Optional[dict[str, int]]
    cache: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[tuple[str, float | None, str]]:
        """(stage, seconds, what it made) for the terminal."""
        meta, took = self.ingest_meta, self.seconds
        reviews = f"{sum(meta['counts'].values()):,} reviews from {Path(meta['source']).name}" + (
            f", {len(meta['skipped'])} left out (see data/skipped_rows.csv)" if meta["skipped"] else "")
        sizes = ", ".join(f"{count:,} {name}" for name, count in (self.sizes or {}).items())
        tokens = ""
        if self.encoded is not None:
            kind = f"{len(self.encoded.codes):,} n-grams" if self.encoded.ngrams else f"{len(self.encoded.vocabulary):,} tokens"
            tokens = f"{kind}, {self.encoded.x_train.shape[1]} a review"
        if set(self.cache.values()) == {"hit"}:
            return [("data", took.get("vectorize"), f"from the stage cache: {sizes}; {tokens}")]
        shown = [("ingest", took.get("ingest"), reviews + (", from the stage cache" if self.cache["ingest"] == "hit" else ""))]
        return shown + [line for line in (("split", took.get("split"), sizes), ("vectorize", took.get("vectorize"), tokens))
                        if line[2]]


@contextmanager
def clocked(seconds: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def prepare(cfg: PipelineConfig) -> Prepared:
    """ingest -> split -> vectorize, as far as cfg.stages goes, reusing cached products that match."""
    seconds: dict[str, float] = {}
    store = StageCache(cfg.cache_dir) if cfg.stage_cache else None
    if cfg.ingest.source != "keras":
        ingest.locate(cfg.ingest)  # download first if needed, so that the key sees the real file
    settings = {k: v for k, v in asdict(cfg.ingest).items() if k not in INGEST_KEY_SKIPS}
    settings.update(input=ingest.input_digest(cfg.ingest), seed=cfg.seed if cfg.ingest.source == "table" else None)
    ingest_key = make_key("ingest", settings, [ingest])
    vector_key = make_key("vectorize", {
        "ingest": ingest_key, "split": asdict(cfg.split), "seed": cfg.seed if cfg.split.seed is None else None,
        "build": {name: getattr(cfg.build, name) for name in build.VECTORIZE_FIELDS},
        "bags": cfg.build.family in BAG_FAMILIES},
        [ingest, split, build, textmodel]) if "build" in cfg.stages else None
    status = "miss" if store else "off"

    with clocked(seconds, "vectorize"):
        hit = store.load("vectorize", vector_key) if store and vector_key else None
    if hit is not None:
        arrays, meta = hit
        return Prepared(Encoded(vocabulary=meta["vocabulary"], ngrams=meta["ngrams"], **arrays), meta["ingest"], meta["sizes"],
                        dict.fromkeys(("ingest", "split", "vectorize"), "hit"), seconds)
    with clocked(seconds, "ingest"):
        kept = store.load("ingest", ingest_key) if store else None
        if kept is not None:
            meta = kept[1]
            reviews = ingest.Reviews(kept[0]["reviews"], meta["digest"], meta["source"], meta["skipped"], meta["labels"])
        else:
            reviews = ingest.ingest(cfg.ingest, cfg.seed)
    meta = reviews.meta()
    if store is not None and kept is None:
        with clocked(seconds, "cache_write"):
            store.save("ingest", ingest_key, {"reviews": reviews.frame}, meta)
    prepared = Prepared(None, meta, None, {"ingest": "hit" if kept is not None else status}, seconds)
    if "split" not in cfg.stages:
        return prepared
    with clocked(seconds, "split"):
        parts = split.split(reviews.frame, cfg.split, cfg.seed)
    prepared.sizes = parts.sizes()
    if vector_key is None:
        return prepared
    with clocked(seconds, "vectorize"):
        prepared.encoded = build.vectorize(parts, cfg.build)
    prepared.cache.update(split=status, vectorize=status)
    if store is not None:
        with clocked(seconds, "cache_write"):
            store.save("vectorize", vector_key, {k: getattr(prepared.encoded, k) for k in Encoded.ARRAYS},
                       {"vocabulary": prepared.encoded.vocabulary, "ngrams": prepared.encoded.ngrams,
                        "sizes": prepared.sizes, "ingest": meta})
    return prepared
