"""`python benchmarks/budgets.py ARCHIVE [--repeats N] [--only shared|alone|within]`: the overfitting sweep,
`python -m pipeline -m experiment=overfit_sweep` (16 jobs and the early-stopping reference), cold cache, with its
fit.epochs budgets sharing one training per setting (sweep.share_budgets=true, the default) and with each trained
alone, alternating, each in a new folder (empty stage cache, new store). `--within`: also sharing, but each job's
records made within it (sweep.overlap_records=false: the last record not beside the next job). Prints the wall
seconds of each, the trainings and epochs each ran, and the seconds per job outside training: the sweep's wall time
less its trainings' (each training's `seconds.fit` counted once), over its jobs; and the median of each run's own
record (its `seconds.evaluate` and `seconds.log_model`). A command that prints numbers, not a test.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from bench import measured, pipeline_command, spread  # benchmarks/bench.py, beside this file

TARGET = 35.0  # seconds, sharing on (issue 35)


def sweep_record(work: Path) -> dict:
    """The newest sweep's children, read back: jobs, trainings, epochs trained, training and record seconds."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'bench.db'}")
    experiment = client.get_experiment_by_name("bench").experiment_id
    parent = client.search_runs([experiment], "tags.`sweep.parent` = 'true'", order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
    trainings: dict[str, object] = {}  # each training's longest run: the one whose seconds.fit is the training's

    def length(run) -> tuple[int, float]:  # (an early-stopping reference recorded from it: as long a budget, fewer epochs)
        return int(run.data.params["fit.epochs"]), run.data.metrics.get("epochs_trained", 0)

    for child in children:
        key = child.data.tags.get("pipeline.training", child.info.run_id)
        if key not in trainings or length(child) > length(trainings[key]):
            trainings[key] = child
    record = [sum(float(child.data.tags.get(f"seconds.{stage}", 0)) for stage in ("evaluate", "log_model"))
              for child in children]
    return {"jobs": len(children), "trainings": len(trainings),
            "epochs": int(sum(run.data.metrics.get("epochs_trained", 0) for run in trainings.values())),
            "training_s": sum(float(run.data.tags.get("seconds.fit", 0)) for run in trainings.values()),
            "record_s": statistics.median(record)}


MODES = {"shared": ["sweep.share_budgets=true"], "within": ["sweep.share_budgets=true", "sweep.overlap_records=false"],
         "alone": ["sweep.share_budgets=false"]}
LABELS = {"shared": "budgets sharing a training", "within": "sharing, records within each job",
          "alone": "budgets trained alone"}


def compare(archive: str, repeats: int = 1, only: str | None = None, within: bool = False) -> None:
    names = [name for name in MODES if (only == name if only else name != "within" or within)]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"imdb-bench-budgets-{name}-") as folder:
                work = Path(folder)
                out = measured(pipeline_command(archive, work, "experiment=overfit_sweep", *MODES[name], multirun=True),
                               work)
                results[name].append({"wall": out["wall"], "peak_mb": out["peak_mb"], **sweep_record(work)})
            done = results[name][-1]
            print(f"{name}: {done['wall']:.1f} s, {done['jobs']} jobs from {done['trainings']} trainings of "
                  f"{done['epochs']} epochs ({done['training_s']:.1f} s), "
                  f"{(done['wall'] - done['training_s']) / done['jobs']:.2f} s per job outside training",
                  file=sys.stderr, flush=True)
    print(f"{'overfit_sweep, cold cache':40}{'median':>8}  (min-max) over {repeats} repeat(s)")
    for name, runs in results.items():
        first = runs[0]
        label = LABELS[name]
        print(f"{label + ' wall s':40}{spread([r['wall'] for r in runs])}"
              + (f"   target <= {TARGET:.0f}" if name == "shared" else ""))
        print(f"{'  ' + 'jobs, trainings, epochs trained':40}{first['jobs']}, {first['trainings']}, {first['epochs']}")
        print(f"{'  training s (each training once)':40}{spread([r['training_s'] for r in runs])}")
        outside = [(r["wall"] - r["training_s"]) / r["jobs"] for r in runs]
        print(f"{'  s per job outside training':40}{spread(outside)}")
        print(f"{'  s per run, its record (evaluate+model)':40}{spread([r['record_s'] for r in runs])}")
        print(f"{'  peak MB':40}{spread([r['peak_mb'] for r in runs], 0)}")
    if "within" in results:
        saved = [w["wall"] - s["wall"] for s, w in zip(results["shared"], results["within"])]
        print(f"{'overlap saved s (within - shared)':40}{spread(saved)}")
    if only:
        return
    ratios = [s["wall"] / a["wall"] for s, a in zip(results["shared"], results["alone"])]
    print(f"{'ratio shared / alone':40}{spread(ratios)}")


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python benchmarks/budgets.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", nargs="?", default=os.environ.get("IMDB_ARCHIVE"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=tuple(MODES), help="one mode alone (no ratio)")
    parser.add_argument("--within", action="store_true", help="also the sweep with sweep.overlap_records=false")
    args = parser.parse_args()
    compare(str(Path(args.archive).resolve()), args.repeats, args.only, args.within)
