"""The stage cache: products of ingest, split and vectorization kept on disk between runs.

An entry lives in `<cache_dir>/<stage>/<key>/`, where the key hashes the stage's settings, the
identity of its inputs and the source code of the modules that made it, so a changed input, setting or
code never reuses a stale product. Every file's sha256 is in `manifest.json`, written last into a
temporary folder that is then renamed into place: a partial or corrupted entry fails verification and is
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def code_digest(modules: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def make_key(stage: str, settings: Any, modules: Iterable[Any]) -> str:
    text = json.dumps({"stage": stage, "settings": settings, "code": code_digest(modules)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class StageCache:
    """Products are dicts of named numpy arrays, pandas DataFrames and files written in place (a blob
    of streamed texts, .npy files), plus a small JSON `meta`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def meta(self, stage: str, key: str) -> dict | None:
        """The entry's meta without loading its files, or None when there is no usable entry."""
        try:
            return json.loads((self.entry(stage, key) / MANIFEST).read_text())["meta"]
        except (OSError, ValueError, KeyError):
            return None

    def load(self, stage: str, key: str, mmap: bool = False) -> tuple[dict[str, Any], dict] | None:
        """(product, meta) when a complete, verified entry exists; otherwise None (and a broken one is removed).
        `mmap`: arrays are mapped read-only from their files rather than read into memory."""
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
                if info["kind"] == "frame":
                    product[name] = pd.read_parquet(path)
                elif info["kind"] == "blob":  # large: read where it lies, by whoever uses it
                    product[name] = path
                else:
                    product[name] = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
            return product, manifest["meta"]
        except (OSError, ValueError, KeyError) as error:
            log.warning("%s: cache entry %s is damaged (%s); rebuilding it", stage, folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def begin(self, stage: str, key: str) -> Path:
        """A new staging folder for an entry, for products whose large files are written in place
        (streamed); `commit` moves it into place, `discard` drops it."""
        folder = self.entry(stage, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, stage: str, key: str, staging: Path, product: dict[str, Any], meta: dict,
               hashes: dict[str, str] | None = None) -> Path:
        """Write `product` into `staging`, then the manifest, and move the folder into place; returns the
        entry's folder. A value that is a Path names a file already written into `staging` (a .npy file
        loads as an array, any other file as its path, kind "blob"); its sha256 is read from the file
        unless `hashes` has it (computed while the file was written)."""
        hashes = hashes or {}
        try:
            files = {}
            for name, value in product.items():
                if isinstance(value, Path):
                    file = value.name
                    kind = "array" if file.endswith(".npy") else "blob"
                elif isinstance(value, pd.DataFrame):
                    file, kind = f"{name}.parquet", "frame"
                    value.to_parquet(staging / file, index=False)
                else:
                    file, kind = f"{name}.npy", "array"
                    np.save(staging / file, np.asarray(value), allow_pickle=False)
                files[name] = {"file": file, "kind": kind, "sha256": hashes.get(name) or sha256_file(staging / file)}
            (staging / MANIFEST).write_text(json.dumps({"files": files, "meta": meta}, indent=1))
            try:
                os.rename(staging, self.entry(stage, key))
            except OSError:  # another process finished the same entry first; theirs is as good
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.entry(stage, key)

    def save(self, stage: str, key: str, product: dict[str, Any], meta: dict) -> None:
        self.commit(stage, key, self.begin(stage, key), product, meta)
