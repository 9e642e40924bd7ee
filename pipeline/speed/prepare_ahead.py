"""prepare_ahead: the data stages in a worker process, while this process opens the run and loads TensorFlow.

The worker is a fresh interpreter (spawned: safe whatever threads run here) that calls the story's own
`prepare(cfg, step)` with a quiet copy of the run's Steps; the run takes its product and its Steps' seconds,
cache hits and lines when it needs the data. Arrays of more than SPILL bytes come back through files, not the
pipe (a pickle would hold a second and third copy of a big table's ids in memory at once), in a folder the run names
(`.handover-<its pid>-...` in cache_dir) and removes when it ends, however it ends; one left by a run that was killed
outright is removed by the next run that hands over there. The stage cache's entries the worker made are
written after the handover, while the run builds and fits (their locks held until then: a job that misses one
meanwhile waits for it), and the run waits for that write at its end (`written()`; a run that failed after the
handover too, not one interrupted), so the next job or run finds them; an array handed over through a file becomes
the entry's by a second name (a hard link), not written twice. The worker is not a daemon, so that a big table's
vectorizing may start workers of its own (pipeline/chunks.py); it leaves once it has written, or is stopped when the
run ends first (SIGTERM: it ends its own workers and removes an entry's unfinished copy on the way out); Ctrl-C is
the run's (the worker ignores it).

A sweep whose jobs all read the same data starts one such worker at its start (`warming`), while it opens its
store and plans its jobs: it makes the data and writes the stage cache's entries, handing nothing over. The sweep's
jobs then start no worker of their own: each reads the entries once TensorFlow has loaded (the first one waiting on
their locks until they are written).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from pipeline.speed import Handover
from pipeline.workers import end

log = logging.getLogger(__name__)
PREFIX = ".handover-"
SWEEP_WORKER = "PIPELINE_SWEEP_DATA_WORKER"  # set while a sweep's data worker runs (warming): its process id
SPILL = 256 << 20  # bytes of arrays above which they come back through files (the archive's are 77 MB)


def can_start(cfg) -> bool:
    """Only worth it while TensorFlow is still to load, and only safe in a main module started with -m
    (`python -m pipeline`, whose code is guarded): a spawned worker imports the main module again. Not in a job of a
    sweep whose data worker makes its data (`warming`): the job reads it from the stage cache once TensorFlow has
    loaded, rather than a second worker taking the cores the first one and TensorFlow's start need."""
    main = sys.modules["__main__"]
    return ("build" in cfg.stages and "tensorflow" not in sys.modules and not os.environ.get(SWEEP_WORKER)
            and getattr(main, "__spec__", None) is not None and multiprocessing.parent_process() is None)


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # (unwinds: a pool of the worker's own ends with it)


def work(send, prepare, cfg, step, folder: Path) -> None:
    """In the worker: (True, (data, the Steps that made it)) or (False, the error), sent to the run, big arrays
    through files in `folder`; then the stage cache's entries it made are written (their locks held until then:
    Steps.write_later) and (True, their seconds) or (False, the error) sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    try:
        data = prepare(cfg, step)
        result = (True, (spill(data, folder), step))
    except Exception as error:  # (handed to the run, which raises it)
        result = (False, error)
        try:
            step.write_kept()  # what was made before the error is kept, as without the worker
        except Exception as failure:  # (the run is told the stage's error, not this one)
            log.warning("could not keep the stage cache's entries made before the error (%s)", failure)
    _send(send, result)
    if result[0]:
        try:
            step.write_kept()  # while the run builds and fits (it waits for this at its end: written())
            _send(send, (True, step.seconds.get("cache_write")))
        except Exception as error:
            _send(send, (False, error))


def _send(send, result) -> None:
    try:
        send.send(result)
    except Exception as error:  # an error that does not pickle: its text
        send.send((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]} ({error})")))


def handover_folder(near: str) -> Path:
    """Where the worker is to put big arrays: a new name in `near` (cache_dir: on disk, where the system's temporary
    folder may be memory), or in the system's temporary folder where `near` cannot be written. Folders there that
    runs no longer alive named are removed first (a run killed outright cannot remove its own)."""
    try:
        Path(near).mkdir(parents=True, exist_ok=True)
        place = Path(near)
        probe = tempfile.mkdtemp(prefix=PREFIX, dir=place)
        os.rmdir(probe)
    except OSError:
        place = Path(tempfile.gettempdir())
    for left in place.glob(f"{PREFIX}*"):
        pid = left.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return place / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def spill(data, folder: Path):
    """`data` with the encoded arrays in files in `folder` when they are big: Encoded's arrays become their paths."""
    from pipeline.build import Encoded

    encoded = data.encoded
    if encoded is None or sum(getattr(encoded, name).nbytes for name in Encoded.ARRAYS) < SPILL:
        return data
    import numpy as np

    folder.mkdir()
    for name in Encoded.ARRAYS:
        np.save(folder / f"{name}.npy", getattr(encoded, name), allow_pickle=False)
        setattr(encoded, name, str(folder / f"{name}.npy"))
    return data


def unspill(data):
    """The arrays spill() put in files, read back (and the files removed)."""
    from pipeline.build import Encoded

    encoded = data.encoded
    paths = [getattr(encoded, name) for name in Encoded.ARRAYS] if encoded is not None else []
    if not paths or not isinstance(paths[0], str):
        return data
    import numpy as np

    for name, path in zip(Encoded.ARRAYS, paths):
        setattr(encoded, name, np.load(path, allow_pickle=False))
    return data  # (the run removes the folder: started())


@contextmanager
def started(cfg, prepare, step):
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    folder = handover_folder(cfg.cache_dir)
    worker = context.Process(target=work, args=(send, prepare, cfg, step.quiet(), folder), name="prepare-ahead")

    def prepared():
        try:
            ok, result = receive.recv()
        except EOFError:
            stop()
            raise RuntimeError(f"the worker that prepares the data ended with exit code {worker.exitcode} "
                               "before handing it over (prepare_ahead=false does the work in this process)") from None
        if not ok:
            stop()
            raise result
        data, done = result
        step.taken(done)
        taken.append(True)
        return unspill(data)  # (the worker writes the stage cache's new entries meanwhile)

    def written():
        """Wait for the worker to write the stage cache's entries it made (a run that ends normally: the next job or
        run finds them), and keep that write's seconds as cache_write."""
        try:
            ok, result = receive.recv()
        except EOFError:
            ok, result = True, None
            log.warning("the data worker ended with exit code %s before it wrote the stage cache; the next run makes "
                        "the data again", worker.exitcode)
        worker.join(10.0)  # (it leaves once it has sent this)
        stop()
        if not ok:
            raise result
        if result is not None:
            step.seconds["cache_write"] = step.seconds.get("cache_write", 0.0) + result

    def stop():
        if worker.pid is not None and worker.exitcode is None:  # (started, not ended)
            end(worker, grace=10.0)  # (SIGTERM: it ends its own workers and removes its files first)

    taken: list = []  # (the data handed over)
    try:
        worker.start()
        send.close()  # (the worker's copy alone: its end, or its death, ends the run's wait)
        log.info("ingest, split, vectorize: in a worker process while TensorFlow loads")
        yield Handover(prepared, written)
    except Exception:  # a run that failed after the handover still keeps the data it made (not one that is interrupted)
        if taken and worker.exitcode is None:
            try:
                written()
            except Exception as error:
                log.warning("could not keep the stage cache's entries (%s)", error)
        raise
    finally:
        stop()
        receive.close()
        shutil.rmtree(folder, ignore_errors=True)  # (handed over or not: a run that ends early leaves no copy)


def can_warm(cfg, axes, launcher: str) -> bool:
    """Whether a sweep over `axes` (its swept keys or groups) launched by `launcher` (Hydra's _target_) gains from
    making the data at its start: its jobs all read the data `cfg` (the sweep's own settings) reads, on this machine
    (in this process or joblib's workers, not Ray's), through the stage cache."""
    if not cfg.stage_cache or "ray" in launcher.lower() or not can_start(cfg):
        return False
    from pipeline.speed.cache import changes_data

    return not any(changes_data(key) for key in axes)


def warm(prepare, cfg) -> None:
    """In the sweep's data worker: `prepare(cfg, ...)`, its products kept in the stage cache, telling nothing (the
    first job tells what it took; an error here is made again by the job, which says it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    logging.getLogger().addHandler(logging.NullHandler())  # (warnings: the job's to give)
    from pipeline.speed import CACHED_STAGES, stage_cache
    from pipeline.steps import Steps

    try:
        store = stage_cache(cfg)
        if not all(store.entry(stage, store.key(stage)).exists() for stage in CACHED_STAGES):  # (kept: nothing to do)
            prepare(cfg, Steps(cfg, store, tell=False))
    except Exception:
        pass


def sweep_worker(cfg, axes, launcher: str, prepare):
    """The sweep's data worker started, when it gains (can_warm); returns the function that stops it, or None."""
    if not can_warm(cfg, axes, launcher):
        return None
    try:
        return warming(cfg, prepare)
    except Exception as error:  # (a speed mechanism: the first job makes the data itself)
        log.warning("the sweep's data worker did not start (%s): the first job makes the data", error)
        return None


def warming(cfg, prepare):
    """Start the sweep's data worker (its process id in SWEEP_WORKER, which the sweep's jobs inherit); returns the
    function that stops it, if still working, at the sweep's end."""
    worker = multiprocessing.get_context("spawn").Process(target=warm, args=(prepare, cfg), name="prepare-ahead-sweep")
    worker.start()
    os.environ[SWEEP_WORKER] = str(worker.pid)
    log.info("ingest, split, vectorize: in a worker process while the sweep starts, unless the stage cache has them "
             "(its jobs read them from there)")

    def stop() -> None:
        atexit.unregister(stop)
        os.environ.pop(SWEEP_WORKER, None)
        if worker.exitcode is None:
            end(worker, grace=10.0)  # (SIGTERM: it removes an entry's unfinished copy on the way out)

    # (at the process's end, before multiprocessing's own handler, registered with this first worker, which would wait
    # for it to finish: a sweep interrupted as it starts ends at once)
    atexit.register(stop)
    return stop
