"""Fetching the archive: a download with a progress bar, kept only when its sha256 matches, and a record
beside it that the pipeline fetched it (so that advice to "download it again" goes only to a file that was).

In: a URL, a target path and the expected sha256. Out: the file at the target and `<target>.sha256`
(sha256sum's format, `sha256sum -c` checks it); nothing at all when the download fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def downloaded(path: Path) -> bool:
    """Whether the pipeline downloaded `path` (its record is beside it), rather than a user putting it there."""
    return record(path).is_file()


def record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def progress(what: str, done: int, total: int, every: float = 0.25) -> None:
    """A progress bar, on standard error or output, whichever is a terminal (in the worker that prepares
    the data, standard error is the run's log); a line at most every `every` seconds, and at the end."""
    global _last_bar
    now, end = time.monotonic(), bool(total) and done >= total
    stream = next((stream for stream in (sys.stderr, sys.stdout) if stream.isatty()), None)
    if stream is None or (now - _last_bar < every and not end):
        return
    _last_bar = now
    print(f"\r{what}: {f'{done / total:6.1%}' if total else f'{done >> 20} MB'}", end="\n" if end else "",
          file=stream, flush=True)


_last_bar = 0.0  # when progress() last drew


def download(url: str, target: Path, sha256: str | None) -> Path:
    """Fetch `url` to `target` with a progress bar; verify the checksum before keeping it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                progress(f"downloading {url}", done, total)
        if not total:  # (with a size, the last block drew the last line)
            progress(f"downloading {url}", done, done)
        if sha256 and sha256_file(Path(partial)) != sha256:
            raise ValueError(f"{url}: the download's sha256 does not match {sha256}; nothing was kept")
        digest = sha256 or sha256_file(Path(partial))
        shutil.move(partial, target)
        record(target).write_text(f"{digest}  {target.name}\n")
        return target
    except (urllib.error.URLError, OSError) as error:
        raise FileNotFoundError(
            f"No local copy at {target}, and downloading {url} failed ({error}). "
            f"Put the archive at {target}, or point ingest.path (or the IMDB_ARCHIVE environment "
            "variable) at a local copy of aclImdb_v1.tar.gz or of its extracted folder.") from None
    finally:
        Path(partial).unlink(missing_ok=True)
