"""fit.compile_cache: XLA's compiled programs kept on disk, so that a later run loads them instead of compiling.

TensorFlow's own persistent compilation cache (the flag --tf_xla_persistent_cache_directory in TF_XLA_FLAGS),
pointed at `cache_dir`/xla/<kind of machine> for the run and put back after it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from pipeline.fit import cpuinfo

log = logging.getLogger(__name__)
XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


@contextmanager
def compile_cache(cache_dir: str) -> Iterator[Path | None]:
    """Inside, XLA's persistent compilation cache (a TensorFlow flag in TF_XLA_FLAGS) is
    `cache_dir`/xla/<kind of machine>: a run whose compiled programs were built before loads them instead
    of compiling. The files are machine code, so the folder is named for the TensorFlow version and the
    CPU's features. TensorFlow reads the flag once, at its first compilation, so it must be set before that
    and stays in force for the process; the environment variable is put back as it was at the end. A flag
    the user set wins; once TensorFlow has started, nothing changes."""
    flags = os.environ.get("TF_XLA_FLAGS")
    folder = None if XLA_CACHE_FLAG in (flags or "") or "tensorflow" in sys.modules else _cache_folder(cache_dir)
    if folder is not None:
        os.environ["TF_XLA_FLAGS"] = f"{flags or ''} {XLA_CACHE_FLAG}={folder}".strip()
    try:
        yield folder
    finally:
        if folder is not None:
            if flags is None:
                os.environ.pop("TF_XLA_FLAGS", None)
            else:
                os.environ["TF_XLA_FLAGS"] = flags


def _cache_folder(cache_dir: str) -> Path | None:
    kind = [platform.machine(), cpuinfo(("flags", "Features")) or platform.processor()]
    for package in ("tensorflow-cpu", "tensorflow"):
        try:
            kind.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    folder = (Path(cache_dir) / "xla" / hashlib.sha256("\n".join(kind).encode()).hexdigest()[:16]).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.debug("no XLA compilation cache (%s)", error)
        return None
    return folder
