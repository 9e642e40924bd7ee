"""`python benchmarks/bench.py ARCHIVE`: the pipeline against the tutorial's plain script, side by side.

Runs, alternating and repeated, each in its own process: (1) the reference, the tutorial's code on the
same archive, untracked; (2) the pipeline from a cold start (empty stage cache, new tracking store);
(3) the pipeline again with the cache warm. Prints per-stage seconds, fit seconds per epoch after the
first, peak memory (the whole process tree, sampled), test accuracy, medians with min-max over the
repeats, and the pipeline/reference ratios. `--ablate` runs the pipeline again with each speed
mechanism switched off, one row per mechanism with what it saves; `--sweep` times the 16-job
overfitting sweep against the same jobs run alone (its budgets sharing a training against each trained alone:
benchmarks/budgets.py). A command that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parents[1]


def sweep_axes() -> dict[str, list[str]]:
    """The overfitting sweep's axes as conf/experiment/overfit_sweep.yaml declares them (their one home)."""
    from omegaconf import OmegaConf

    from pipeline.config import CONF

    params = OmegaConf.load(CONF / "experiment" / "overfit_sweep.yaml").hydra.sweeper.params
    return {key: [value.strip() for value in str(values).split(",")] for key, values in params.items()}


def reference(archive: str, seed: int = 42) -> dict:
    """The tutorial's script: Embedding(10000, 16) -> GlobalAveragePooling1D -> Dense(16, relu) -> Dense(1,
    sigmoid); adam; the first 10,000 (shuffled) training reviews held out; 40 epochs; batch 512; then
    evaluate. Its inputs are made as the tutorial's are (its standardization, 10,000 tokens adapted on the
    training reviews, pad_sequences(maxlen=256, padding="post"), which keeps a review's last 256 tokens),
    from the reviews ordered and shuffled as the pipeline orders them, so that both train on one split."""
    import re
    import string
    import tarfile

    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    found = {"train": [], "test": []}
    with tarfile.open(archive) as tar:
        for member in tar:
            match = re.search(r"aclImdb/(train|test)/(pos|neg)/(\d+)_\d+\.txt$", member.name)
            if match:
                text = tar.extractfile(member).read().decode("utf-8")
                found[match[1]].append((int(match[2] == "pos"), int(match[3]), text))
    train, test = sorted(found["train"]), sorted(found["test"])
    order = np.random.default_rng(seed).permutation(len(train))
    train_texts = np.array([text for _, _, text in train], dtype=object)[order]
    train_labels = np.array([label for label, _, _ in train], dtype="float32")[order]
    test_texts = np.array([text for _, _, text in test], dtype=object)
    test_labels = np.array([label for label, _, _ in test], dtype="float32")

    def custom_standardization(input_data):
        lowercase = tf.strings.lower(input_data)
        stripped_html = tf.strings.regex_replace(lowercase, "<br />", " ")
        return tf.strings.regex_replace(stripped_html, f"[{re.escape(string.punctuation)}]", "")

    vectorize = keras.layers.TextVectorization(max_tokens=10000, standardize=custom_standardization, ragged=True)
    vectorize.adapt(train_texts[10000:])

    def pad_sequences(texts):  # keras.utils.pad_sequences(ids, maxlen=256, padding="post"), on the ragged tensor
        return vectorize(texts)[:, -256:].to_tensor(default_value=0, shape=[None, 256]).numpy()

    x_train, x_test = pad_sequences(train_texts), pad_sequences(test_texts)

    keras.utils.set_random_seed(seed)
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

    history = model.fit(x_train[10000:], train_labels[10000:], epochs=40, batch_size=512,
                        validation_data=(x_train[:10000], train_labels[:10000]), verbose=0, callbacks=[Clock()])
    loss, accuracy = model.evaluate(x_test, test_labels, verbose=0)
    return {"fit": sum(epoch_times), "epoch_after_first": statistics.median(epoch_times[1:]),
            "test_accuracy": accuracy, "val_loss": history.history["val_loss"]}


# -- measuring a process ------------------------------------------------------------------------------
def _tree_rss_mb(process: "psutil.Process") -> float:
    """Resident memory of `process` and all its descendants."""
    total = 0
    try:
        tree = [process, *process.children(recursive=True)]
    except psutil.Error:  # it ended meanwhile
        return 0.0
    for each in tree:
        try:
            total += each.memory_info().rss
        except psutil.Error:  # ended meanwhile
            pass
    return total / 2**20


def measured(args: list[str], cwd: Path) -> dict:
    """Wall seconds, peak memory of the process tree (sampled every 50 ms) and stdout of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, watched = [0.0], psutil.Process(process.pid)

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(watched))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = process.stdout.read()
    process.wait()
    wall = time.perf_counter() - start
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{' '.join(args)} failed with exit code {process.returncode}")
    return {"wall": wall, "peak_mb": peak[0], "stdout": stdout}


def pipeline_command(archive: str, work: Path, *overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "pipeline", *(["-m"] if multirun else []), f"ingest.path={archive}",
            f"tracking.uri=sqlite:///{work / 'bench.db'}",
            f"cache_dir={work / 'cache'}", f"hydra.run.dir={work / 'out'}", f"hydra.sweep.dir={work / 'multirun'}",
            "tracking.experiment_name=bench", *overrides]


def last_run(work: Path) -> dict:
    """The newest run's stage seconds, per-epoch seconds and results, read back from its store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'bench.db'}")
    run = mlflow.search_runs(experiment_names=["bench"], order_by=["attributes.start_time DESC"]).iloc[0]
    client = mlflow.MlflowClient()
    epochs = [m.value for m in sorted(client.get_metric_history(run["run_id"], "epoch_seconds"), key=lambda m: m.step)]
    val_loss = [m.value for m in sorted(client.get_metric_history(run["run_id"], "val_loss"), key=lambda m: m.step)]
    seconds = {k.removeprefix("tags.seconds."): float(v) for k, v in run.items()
               if k.startswith("tags.seconds.") and isinstance(v, str)}  # stages a warm run skipped have none
    return {"seconds": seconds, "epoch_after_first": statistics.median(epochs[1:]),
            # the last epoch's, as the script's: the served model is the best epoch's (docs/checkpoints.md)
            "test_accuracy": float(run.get("metrics.last.test_accuracy", run["metrics.test_accuracy"])),
            "val_loss": val_loss}


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):8.{digits}f}  ({min(values):.{digits}f}-{max(values):.{digits}f})"


def best_epoch(val_loss: list[float]) -> int:
    return val_loss.index(min(val_loss)) + 1


# -- the three parts ----------------------------------------------------------------------------------
# Each speed mechanism: the run it speeds up (cold: empty cache, new store; warm: both from the cold run)
# and the override that switches it off.
ABLATIONS = {"prepare_ahead": ("cold", "prepare_ahead=false"), "stage_cache": ("warm", "stage_cache=false"),
             "freeze_gc": ("warm", "freeze_gc=false"), "fit.compile_cache": ("warm", "fit.compile_cache=false"),
             "fit.loop=epoch": ("warm", "fit.loop=keras"), "fit.dense_gradients": ("warm", "fit.dense_gradients=false")}


def compare_runs(archive: str, repeats: int, ablate: bool = False) -> None:
    results: dict[str, list[dict]] = {"reference": [], "cold": [], "warm": [], **{name: [] for name in ABLATIONS}}
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory(prefix="imdb-bench-") as folder:
            work = Path(folder)
            out = measured([sys.executable, str(Path(__file__).resolve()), archive, "--reference-only"], work)
            results["reference"].append({**out, **json.loads(out["stdout"].strip().splitlines()[-1])})
            for kind in ("cold", "warm"):
                out = measured(pipeline_command(archive, work), work)
                results[kind].append({**out, **last_run(work)})
            for name, (kind, override) in ABLATIONS.items() if ablate else ():
                where = work if kind == "warm" else work / name  # a cold run starts in a folder of its own
                where.mkdir(exist_ok=True)
                out = measured(pipeline_command(archive, where, override), where)
                results[name].append({**out, **last_run(where)})
        print(f"repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)

    ref = results["reference"]
    print(f"{'':36}{'median':>8}  (min-max) over {repeats} repeats")
    print(f"reference {'fit s':26}{spread([r['fit'] for r in ref])}")
    print(f"reference {'fit s/epoch after 1st':26}{spread([r['epoch_after_first'] for r in ref], 3)}")
    print(f"reference {'wall s':26}{spread([r['wall'] for r in ref])}")
    print(f"reference {'peak MB':26}{spread([r['peak_mb'] for r in ref], 0)}")
    print(f"reference {'test accuracy':26}{spread([r['test_accuracy'] for r in ref], 4)}")
    for kind in ("cold", "warm"):
        runs = results[kind]
        for stage in sorted({s for r in runs for s in r["seconds"]}):
            print(f"pipeline {kind} {stage + ' s':22}{spread([r['seconds'].get(stage, 0.0) for r in runs])}")
        if kind == "cold":
            prepare = [sum(r["seconds"].get(s, 0.0) for s in ("ingest", "split", "vectorize")) for r in runs]
            print(f"pipeline cold {'ingest+split+vectorize s':22}{spread(prepare)}")
        print(f"pipeline {kind} {'fit s/epoch after 1st':22}{spread([r['epoch_after_first'] for r in runs], 3)}"
              + ("   floor 0.15" if kind == "cold" else ""))
        print(f"pipeline {kind} {'wall s':22}{spread([r['wall'] for r in runs])}")
        print(f"pipeline {kind} {'peak MB':22}{spread([r['peak_mb'] for r in runs], 0)}   floor 2560")
        print(f"pipeline {kind} {'test accuracy':22}{spread([r['test_accuracy'] for r in runs], 4)}")
        ratios = [r["wall"] / f["wall"] for r, f in zip(runs, ref)]
        print(f"ratio {kind} wall / reference wall      {spread(ratios)}   floor {0.5 if kind == 'cold' else 0.3}")
    epochs = [r["epoch_after_first"] / f["epoch_after_first"] for r, f in zip(results["cold"], ref)]
    print(f"ratio fit s/epoch / reference           {spread(epochs)}")
    points = [100 * (r["test_accuracy"] - f["test_accuracy"]) for r, f in zip(results["cold"], ref)]
    print(f"test accuracy, pipeline - reference (points) {spread(points)}   floor |x| <= 0.5")
    gap = [max(abs(a - b) for a, b in zip(r["val_loss"], f["val_loss"])) for r, f in zip(results["cold"], ref)]
    print(f"val_loss curves, largest gap per epoch       {spread(gap, 4)}")
    print(f"lowest val_loss at epoch: reference {[best_epoch(r['val_loss']) for r in ref]}, "
          f"pipeline {[best_epoch(r['val_loss']) for r in results['cold']]}")
    if ablate:
        print(f"\n{'mechanism (switched off by)':44} {'run':>4} {'with s':>7} {'without s':>10} "
              f"{'saving s':>9}  saving % of the run (min-max)   keep if >= 5 %")
        for name, (kind, override) in ABLATIONS.items():
            on, off = [r["wall"] for r in results[kind]], [r["wall"] for r in results[name]]
            shares = [100 * (b - a) / a for a, b in zip(on, off)]
            accuracy = sorted({f"{r['test_accuracy']:.4f}" for r in results[name]})
            print(f"{name + ' (' + override + ')':44} {kind:>4} {statistics.median(on):7.1f} "
                  f"{statistics.median(off):10.1f} {statistics.median(off) - statistics.median(on):9.1f}  "
                  f"{spread(shares, 1)}   test accuracy without: {', '.join(accuracy)}")


def compare_sweep(archive: str, launchers: list[str], ablate: bool = False) -> None:
    """The 16-job overfitting sweep (data prepared once, start-up paid once) against the same 16 jobs each
    run alone with a warm cache; with `ablate`, the basic launcher's sweep again with stage_cache=false."""
    declared = sweep_axes()
    axes = [f"{key}={','.join(values)}" for key, values in declared.items()]
    settings = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep.threads=1"]}
    with tempfile.TemporaryDirectory(prefix="imdb-bench-sweep-") as folder:
        work = Path(folder)
        walls = {}
        if ablate:
            settings["basic, stage_cache=false"] = ["stage_cache=false"]
            launchers = [*launchers, "basic, stage_cache=false"]
        for name in launchers:
            shutil.rmtree(work / "cache", ignore_errors=True)  # each sweep starts cold
            out = measured(pipeline_command(archive, work, *axes, "sweep.early_stopping_reference=false",
                                            *settings[name], multirun=True), work)
            walls[name] = out["wall"]
            print(f"sweep of 16 jobs, {name} launcher, cold cache: {out['wall']:.1f} s, peak {out['peak_mb']:.0f} MB",
                  flush=True)
        alone = []
        for job in itertools.product(*([f"{key}={value}" for value in values] for key, values in declared.items())):
            alone.append(measured(pipeline_command(archive, work, *job), work)["wall"])
        print(f"the {len(alone)} jobs one by one, warm cache: sum {sum(alone):.1f} s "
              f"(each {min(alone):.1f}-{max(alone):.1f} s, median {statistics.median(alone):.1f} s)")
        for name, wall in walls.items():
            print(f"ratio sweep ({name}) / sum of jobs alone: {wall / sum(alone):.2f}   floor 0.75")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", nargs="?", default=os.environ.get("IMDB_ARCHIVE"),
                        help="the aclImdb .tar.gz (default: $IMDB_ARCHIVE)")
    parser.add_argument("--repeats", type=int, default=3, help="reference/cold/warm rounds (default 3)")
    parser.add_argument("--sweep", nargs="?", const="basic,joblib", default=None, metavar="LAUNCHERS",
                        help="also time the 16-job sweep against its jobs run alone (launchers: basic,joblib)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run with each speed mechanism off: one row per mechanism, its saving")
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--skip-runs", action="store_true", help="only the --sweep part")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.archive:
        parser.error("give the archive path or set IMDB_ARCHIVE")
    archive = str(Path(args.archive).resolve())
    if args.reference_only:
        print(json.dumps(reference(archive, args.seed)))
        return
    if not args.skip_runs:
        compare_runs(archive, args.repeats, args.ablate)
    if args.sweep:
        compare_sweep(archive, args.sweep.split(","), args.ablate)


if __name__ == "__main__":
    main()
