"""stage_cache: ingest's and vectorize's products kept on disk between runs and reused.

`StageCache(cfg)` gives, for a stage, the product an earlier run made with the same settings, inputs and
code (`load`), and keeps a new one (`save`); pipeline/steps.py calls it around the stage's own call.
An entry lives in `<cache_dir>/<stage>/<key>/`, where the key hashes the stage's settings, the identity of
its inputs and the source code of the modules that made it, so a changed input, setting or code never
reuses a stale product. Every file's sha256 is in `manifest.json`, written last into a temporary folder
that is then renamed into place: a partial or corrupted entry fails verification and is rebuilt, never used.
Under the command line (a sweep's jobs in one process), the last entry read of each stage is kept in memory, its
arrays read-only, and given to the next job that asks for it while its manifest is the same file, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from filelock import FileLock

import pipeline
from pipeline import build, chunks, ingest, split, tables, textmodel
from pipeline.build import Encoded
from pipeline.config import BAG_FAMILIES, PipelineConfig
from pipeline.ingest import Reviews, sha256_file
from pipeline.speed import CACHED_STAGES
from pipeline.tables import TableTexts

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LAST: dict[str, tuple[Path, tuple, dict, str]] = {}  # stage -> (its entry, its manifest's identity, arrays, meta as JSON)
INGEST_KEY_SKIPS = ("path", "url", "sha256", "download")  # where a copy lives is not what it holds


def make_key(stage: str, settings: Any, modules: Iterable[Any]) -> str:
    """A key for `stage`'s product made with `settings` by the code of `modules`."""
    code = hashlib.sha256()
    for module in modules:
        code.update(Path(module.__file__).read_bytes())
    text = json.dumps({"stage": stage, "settings": settings, "code": code.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def pack(product) -> tuple[dict[str, Any], dict]:
    """A stage's product as named arrays and tables, plus a small JSON `meta`."""
    if isinstance(product, Reviews):
        return {"reviews": product.frame}, product.meta()
    return {name: getattr(product, name) for name in Encoded.ARRAYS}, {"vocabulary": product.vocabulary,
                                                                        "ngrams": product.ngrams}


def unpack(stage: str, arrays: dict[str, Any], meta: dict):
    if stage == "ingest":
        return Reviews(arrays["reviews"], meta["digest"], meta["source"], meta["skipped"], meta["labels"])
    return Encoded(vocabulary=meta["vocabulary"], ngrams=meta["ngrams"], **arrays)


class StageCache:
    """The cache of one run's settings: a key per stage, its entries in cfg.cache_dir."""
    on = True

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.root, self.keys = cfg, Path(cfg.cache_dir), {}

    def key(self, stage: str) -> str | None:
        """The key of `stage`'s product under these settings; None for a stage that is not kept."""
        if stage not in CACHED_STAGES:
            return None
        if stage not in self.keys:
            cfg = self.cfg
            if stage == "ingest":
                source = ingest.SOURCES[cfg.ingest.source]
                if source.local:
                    ingest.locate(cfg.ingest)  # download first if needed, so that the key sees the real file
                settings = {k: v for k, v in asdict(cfg.ingest).items() if k not in INGEST_KEY_SKIPS}
                settings.update(input=ingest.input_digest(cfg.ingest), seed=cfg.seed if source.seeded else None)
                self.keys[stage] = make_key("ingest", settings, [ingest, tables])
            else:
                self.keys[stage] = make_key("vectorize", {
                    "ingest": self.key("ingest"), "split": asdict(cfg.split),
                    "seed": cfg.seed if cfg.split.seed is None else None,
                    "build": {name: getattr(cfg.build, name) for name in build.VECTORIZE_FIELDS},
                    "bags": cfg.build.family in BAG_FAMILIES}, [ingest, tables, split, build, chunks, textmodel])
        return self.keys[stage]

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def building(self, stage: str):
        """Held by a run that missed `stage`'s entry while it looks again and, if still missing, makes and keeps
        it: jobs side by side that miss the same entry (a parallel sweep's, cold) make it once, the others wait
        and read it; a hit takes no lock. The lock is the operating system's (fcntl): a process that dies lets it go."""
        folder = self.root / ".locks"  # (beside the stages' folders, which hold entries alone)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # a cache_dir that cannot be written: nothing is kept, nothing to wait for
            return nullcontext()
        return FileLock(folder / f"{stage}-{self.key(stage)}.lock")

    def load(self, stage: str):
        """The product of `stage` kept under its key, or None."""
        kept = self.read(stage, self.key(stage))
        if kept is None:
            return None
        product = unpack(stage, *kept)
        if stage == "ingest" and "text" not in product.frame.columns:  # a table's texts: in this run's copy of it
            product.table = TableTexts(str(Path(self.cfg.ingest.path).expanduser()), self.cfg.ingest.text_column)
        return product

    def save(self, stage: str, product) -> None:
        self.write(stage, self.key(stage), *pack(product))

    def read(self, stage: str, key: str) -> tuple[dict[str, Any], dict] | None:
        """(arrays, meta) when a complete, verified entry exists; otherwise None (a broken one is removed)."""
        folder = self.entry(stage, key)
        if not folder.exists():
            return None
        try:
            identity = _identity(folder / MANIFEST)
            last = LAST.get(stage)
            if last is not None and last[:2] == (folder, identity):  # (read before, in this process: unchanged since)
                return _own(last[2]), json.loads(last[3])
            manifest = json.loads((folder / MANIFEST).read_text())
            arrays = {}
            for name, info in manifest["files"].items():
                path = folder / info["file"]
                if sha256_file(path) != info["sha256"]:
                    raise ValueError(f"{path} does not match its checksum")
                arrays[name] = (pd.read_parquet(path) if info["kind"] == "frame"
                                else np.load(path, allow_pickle=False))
            if pipeline.COMMAND_LINE:  # (the process is the command line's: a sweep's next job may ask again)
                for value in arrays.values():
                    if isinstance(value, np.ndarray):
                        value.flags.writeable = False
                LAST[stage] = (folder, identity, arrays, json.dumps(manifest["meta"]))
                arrays = _own(arrays)
            return arrays, manifest["meta"]
        except (OSError, ValueError, KeyError) as error:
            log.warning("%s: cache entry %s is damaged (%s); rebuilding it", stage, folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def write(self, stage: str, key: str, arrays: dict[str, Any], meta: dict) -> None:
        """Write `arrays` and `meta` into a staging folder, then move it into place. An array given as the path of
        its .npy file is linked there (copied where the file system links none), not written again."""
        folder = self.entry(stage, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))
        try:
            files = {}
            for name, value in arrays.items():
                if isinstance(value, pd.DataFrame):
                    file, kind = f"{name}.parquet", "frame"
                    value.to_parquet(staging / file, index=False)
                elif isinstance(value, str):  # an array in an .npy file already (handed over, prepare_ahead.spill)
                    file, kind = f"{name}.npy", "array"
                    linked(Path(value), staging / file)
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


def _own(arrays: dict[str, Any]) -> dict[str, Any]:
    """A job's own view of arrays kept for the next: each table a copy of its frame (its columns the job's to set), the
    read-only arrays as they are."""
    return {name: value.copy(deep=False) if isinstance(value, pd.DataFrame) else value for name, value in arrays.items()}


def changes_data(key: str) -> bool:
    """Whether a setting named as a sweep's axis (a dotted key or a config group) can change an entry's key (key()):
    every one but the fit's, evaluation's, tracking's and sweep's, `verbose`, and build's non-vectorizing keys."""
    root, _, rest = key.lstrip("+~").partition(".")
    return not (root in ("fit", "evaluate", "tracking", "sweep", "verbose")
                or (root == "build" and rest and rest not in (*build.VECTORIZE_FIELDS, "family")))


def _identity(path: Path) -> tuple:
    """Which file `path` is and whether it changed: its device, inode, size and modification time."""
    found = path.stat()
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def linked(source: Path, target: Path) -> None:
    """`target` as a second name of `source` (the same bytes, on the same file system), else a copy of it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
