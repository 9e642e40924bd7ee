"""`python -m pipeline.bench ARCHIVE`: the pipeline against the tutorial's plain script, side by side.

Runs, alternating and repeated, (1) the reference, the tutorial's code as written on the same archive,
untracked; (2) the pipeline from a cold start (empty stage cache, new tracking store); (3) the pipeline
again with the cache warm. Each runs in its own process. Prints per-stage seconds, fit seconds per epoch,
peak memory, test accuracy, the medians with min-max over repeats, and the pipeline/reference ratios.
A command that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def reference(archive: str) -> dict:
    """The tutorial's script: read, TextVectorization, Embedding -> GlobalAveragePooling1D -> Dense(16) ->
    Dense(1), adam, 10,000 validation reviews, 40 epochs, batch 512, then evaluate. Timed by part."""
    times, start = {}, time.perf_counter()
    import re
    import tarfile

    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    times["import"] = time.perf_counter() - start
    mark = time.perf_counter()
    texts = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    with tarfile.open(archive) as tar:
        for member in tar:
            found = re.search(r"aclImdb/(train|test)/(pos|neg)/\d+_\d+\.txt$", member.name)
            if found:
                texts[found[1]].append(tar.extractfile(member).read().decode("utf-8"))
                labels[found[1]].append(int(found[2] == "pos"))
    order = np.random.default_rng(42).permutation(len(texts["train"]))
    train_texts = np.array(texts["train"], dtype=object)[order]
    train_labels = np.array(labels["train"], dtype="float32")[order]
    times["read"] = time.perf_counter() - mark

    mark = time.perf_counter()

    def standardize(x):
        x = tf.strings.lower(x)
        x = tf.strings.regex_replace(x, "<br />", " ")
        return tf.strings.regex_replace(x, r"[^\w\s]", "")

    vectorize = keras.layers.TextVectorization(max_tokens=10000, standardize=standardize,
                                               output_sequence_length=256)
    vectorize.adapt(train_texts[10000:])
    x_train = vectorize(train_texts).numpy()
    x_test = vectorize(np.array(texts["test"], dtype=object)).numpy()
    times["vectorize"] = time.perf_counter() - mark

    keras.utils.set_random_seed(42)
    model = keras.Sequential([keras.Input(shape=(256,)), keras.layers.Embedding(10000, 16),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    epoch_times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.start)

    mark = time.perf_counter()
    history = model.fit(x_train[10000:], train_labels[10000:], epochs=40, batch_size=512,
                        validation_data=(x_train[:10000], train_labels[:10000]), verbose=0, callbacks=[Clock()])
    times["fit"] = time.perf_counter() - mark
    mark = time.perf_counter()
    loss, accuracy = model.evaluate(x_test, np.array(labels["test"], dtype="float32"), verbose=0)
    times["evaluate"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    val_loss = history.history["val_loss"]
    return {"seconds": times, "epoch_after_first": statistics.median(epoch_times[1:]),
            "test_accuracy": accuracy, "best_val_loss_epoch": val_loss.index(min(val_loss)) + 1}


def _measured(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak resident MB, stdout) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, stdout


def pipeline_run(archive: str, workdir: Path) -> dict:
    import mlflow

    uri = f"sqlite:///{workdir / 'bench.db'}"
    wall, peak, _ = _measured([sys.executable, "-m", "pipeline", f"ingest.path={archive}", f"tracking.uri={uri}",
                               f"cache_dir={workdir / 'cache'}", f"hydra.run.dir={workdir / 'out'}",
                               "tracking.experiment_name=bench"], workdir)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["bench"], order_by=["attributes.start_time DESC"]).iloc[0]
    seconds = {k.removeprefix("tags.seconds."): float(v) for k, v in run.items()
               if k.startswith("tags.seconds.") and isinstance(v, str)}  # stages a warm run skipped have none
    return {"wall": wall, "peak_mb": peak, "seconds": seconds, "test_accuracy": run["metrics.test_accuracy"],
            "fit_per_epoch": seconds["fit"] / int(run["params.fit.epochs"]),
            "best_val_loss_epoch": int(run["metrics.best_val_loss_epoch"])}


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):7.{digits}f}  ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", nargs="?", default=os.environ.get("IMDB_ARCHIVE"),
                        help="the aclImdb .tar.gz (default: $IMDB_ARCHIVE)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.archive:
        parser.error("give the archive path or set IMDB_ARCHIVE")
    archive = str(Path(args.archive).resolve())
    if args.reference_only:
        print(json.dumps(reference(archive)))
        return

    results: dict[str, list[dict]] = {"reference": [], "cold": [], "warm": []}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="imdb-bench-") as folder:
            work = Path(folder)
            wall, peak, out = _measured([sys.executable, "-m", "pipeline.bench", archive, "--reference-only"], work)
            results["reference"].append({"wall": wall, "peak_mb": peak, **json.loads(out.strip().splitlines()[-1])})
            results["cold"].append(pipeline_run(archive, work))
            results["warm"].append(pipeline_run(archive, work))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    print(f"{'':32}{'median':>7}  (min-max) over {args.repeats} repeats")
    ref = results["reference"]
    for part in ("import", "read", "vectorize", "fit", "evaluate"):
        print(f"reference {part + ' s':22}{spread([r['seconds'][part] for r in ref])}")
    print(f"reference {'fit s/epoch after 1st':22}{spread([r['epoch_after_first'] for r in ref])}")
    print(f"reference {'wall s':22}{spread([r['wall'] for r in ref])}")
    print(f"reference {'peak MB':22}{spread([r['peak_mb'] for r in ref])}")
    print(f"reference {'test accuracy':22}{spread([r['test_accuracy'] for r in ref], 4)}")
    for kind in ("cold", "warm"):
        runs = results[kind]
        for stage in sorted({s for r in runs for s in r["seconds"]}):
            print(f"pipeline {kind} {stage + ' s':17}{spread([r['seconds'].get(stage, 0.0) for r in runs])}"
                  + ("  (cache read + model)" if kind == "warm" and stage == "build" else ""))
        print(f"pipeline {kind} {'fit s/epoch (all)':17}{spread([r['fit_per_epoch'] for r in runs])}")
        print(f"pipeline {kind} {'wall s':17}{spread([r['wall'] for r in runs])}")
        print(f"pipeline {kind} {'peak MB':17}{spread([r['peak_mb'] for r in runs])}")
        print(f"pipeline {kind} {'test accuracy':17}{spread([r['test_accuracy'] for r in runs], 4)}")
        ratios = [r["wall"] / f["wall"] for r, f in zip(runs, ref)]
        print(f"ratio {kind} wall / reference wall    {spread(ratios)}")
    print(f"best val-loss epoch: reference {[r['best_val_loss_epoch'] for r in ref]}, "
          f"pipeline {[r['best_val_loss_epoch'] for r in results['cold']]}")


if __name__ == "__main__":
    main()
