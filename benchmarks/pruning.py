"""What pruning saves: the same Optuna search run with the median pruner and without one, side by side.

    python benchmarks/pruning.py PATH/aclImdb_v1.tar.gz [--trials 8] [--epochs 10] [--experiment optuna_search]

Each search is `python -m pipeline -m experiment=...` (the user's command) in a fresh study under a new
working folder (a temporary one unless --workdir), with the same sampler seed: with fewer trials than TPE's
10 random start-up trials, both searches try the same settings, and only the pruner differs. The pruned search
runs first, so that it, not the unpruned one, pays for the cold data cache; XLA's compilation cache is off
in both (fit.compile_cache=false), so that every trial compiles its own programs alike. Printed per search:
trials, pruned, epochs trained, training seconds (the children's `seconds.fit` summed; "epochs 2+": their
epochs after the first, which holds the compilation), the command's wall seconds, the best validation
accuracy. Overrides after `--` go to both searches (e.g. hydra.sweeper.pruners.median.n_startup_trials=3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def search(workdir: Path, data: str, pruner: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """Run one search; read its parent and children back from the MLflow store."""
    from mlflow import MlflowClient

    study = f"pruning-{pruner}"
    command = [sys.executable, "-m", "pipeline", "-m", f"experiment={args.experiment}", f"ingest.path={data}",
               f"fit.epochs={args.epochs}", f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.pruner={pruner}",
               f"hydra.sweeper.study_name={study}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
               f"cache_dir={workdir / 'cache'}", f"hydra.sweep.dir={workdir / 'multirun' / pruner}",
               "fit.compile_cache=false", *extra]  # each trial compiles its own programs, in both searches alike
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (workdir / f"{pruner}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"the {pruner} search failed ({done.returncode}); see {workdir / f'{pruner}.log'}")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imdb-sentiment")
    parent = client.search_runs([experiment.experiment_id], f"tags.`search.study` = '{study}'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    best = max(max(p.value for p in client.get_metric_history(c.info.run_id, "val_accuracy")) for c in children)
    return {"search": pruner, "trials": len(children),
            "pruned": sum(c.data.tags.get("search.pruned") == "true" for c in children),
            "epochs": int(sum(c.data.metrics.get("epochs_trained", 0) for c in children)),
            "fit_seconds": sum(float(c.data.tags.get("seconds.fit", "nan")) for c in children),
            # the epochs after each trial's first, which holds XLA's compilation: what pruning can cut
            "later_seconds": sum(p.value for c in children for p in client.get_metric_history(c.info.run_id, "epoch_seconds")
                                 if p.step > 1),
            "wall_seconds": wall, "best_val_accuracy": best}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python benchmarks/pruning.py", description=__doc__.split("\n")[0])
    parser.add_argument("data", help="the aclImdb archive (.tar.gz) or folder")
    parser.add_argument("--trials", type=int, default=8, help="trials in each search (default 8)")
    parser.add_argument("--epochs", type=int, default=10, help="each trial's epoch budget (default 10)")
    parser.add_argument("--experiment", default="optuna_search", help="optuna_search (default) or nbsvm_search")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="pruning-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).resolve())
    sys.path.insert(0, str(PROJECT))
    rows = [search(workdir, data, pruner, args, extra) for pruner in ("median", "none")]
    print(f"\n{args.experiment}, {args.trials} trials of up to {args.epochs} epochs, in {workdir}")
    print(f"{'search':<8} {'trials':>6} {'pruned':>6} {'epochs':>6} {'fit s':>8} {'epochs 2+ s':>11} {'wall s':>8} "
          f"{'best val acc':>12}")
    for row in rows:
        print(f"{row['search']:<8} {row['trials']:>6} {row['pruned']:>6} {row['epochs']:>6} {row['fit_seconds']:>8.1f} "
              f"{row['later_seconds']:>11.1f} {row['wall_seconds']:>8.1f} {row['best_val_accuracy']:>12.4f}")
    pruned, full = rows
    print(f"pruning saved {full['epochs'] - pruned['epochs']} of {full['epochs']} epochs, "
          f"{full['fit_seconds'] - pruned['fit_seconds']:.1f} s of training "
          f"({1 - pruned['fit_seconds'] / full['fit_seconds']:.0%}; after each trial's first epoch "
          f"{full['later_seconds'] - pruned['later_seconds']:.1f} s, {1 - pruned['later_seconds'] / full['later_seconds']:.0%}); "
          f"best validation accuracy {pruned['best_val_accuracy']:.4f} vs {full['best_val_accuracy']:.4f} without")


if __name__ == "__main__":
    main()
