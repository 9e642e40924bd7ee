"""`python benchmarks/families.py ARCHIVE`: what each model family costs, and the comparison sweep.

Runs each family's default run (`build=<family>`) from a cold start, each in its own process with an
empty stage cache and a new store, then `-m experiment=model_comparison` (every family at three seeds,
cold cache) and reads its ranking back from the parent run. Prints wall seconds, peak memory of the
process tree, training seconds and test accuracy per family, the ranking and the floors beside them.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench import last_run, measured, pipeline_command, spread  # benchmarks/bench.py, beside this file

from pipeline.config import FAMILIES


def ranking(work: Path):
    """The newest sweep parent's analysis/ranking.csv and its best family tag."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient(f"sqlite:///{work / 'bench.db'}")
    parent = client.search_runs([client.get_experiment_by_name("bench").experiment_id],
                                "tags.`sweep.parent` = 'true'", order_by=["attributes.start_time DESC"])[0]
    path = client.download_artifacts(parent.info.run_id, "analysis/ranking.csv", str(work))
    return pd.read_csv(path), parent.data.tags.get("sweep.best_family")


def compare_families(archive: str, repeats: int) -> None:
    results: dict[str, list[dict]] = {family: [] for family in FAMILIES}
    for repeat in range(repeats):
        for family in FAMILIES:
            with tempfile.TemporaryDirectory(prefix=f"imdb-bench-{family}-") as folder:
                out = measured(pipeline_command(archive, Path(folder), f"build={family}"), Path(folder))
                results[family].append({**out, **last_run(Path(folder))})
    print(f"{'family, default run, cold':28}{'wall s':>22}{'peak MB':>22}{'fit s':>22}{'test accuracy':>26}")
    for family, runs in results.items():
        print(f"{family:28}{spread([r['wall'] for r in runs]):>22}{spread([r['peak_mb'] for r in runs], 0):>22}"
              f"{spread([r['seconds']['fit'] for r in runs]):>22}{spread([r['test_accuracy'] for r in runs], 4):>26}")
    worst = max(r["wall"] for runs in results.values() for r in runs)
    peak = max(r["peak_mb"] for runs in results.values() for r in runs)
    print(f"slowest family run {worst:.1f} s   floor 60; largest peak {peak:.0f} MB   floor 4096")

    with tempfile.TemporaryDirectory(prefix="imdb-bench-comparison-") as folder:
        work = Path(folder)
        out = measured(pipeline_command(archive, work, "experiment=model_comparison", multirun=True), work)
        table, best = ranking(work)
    print(f"\nmodel_comparison sweep (12 jobs, cold cache): {out['wall']:.1f} s   floor 360; peak {out['peak_mb']:.0f} MB")
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    chosen = table[table["family"] == best].iloc[0]
    print(f"best family by validation accuracy: {best}, test accuracy {chosen.test_accuracy_mean:.4f} "
          f"(mean of {int(chosen.runs)} seeds)   floor 0.91; median of families' fit s "
          f"{statistics.median(table['fit_seconds']):.1f}")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python benchmarks/families.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", nargs="?", default=os.environ.get("IMDB_ARCHIVE"),
                        help="the aclImdb .tar.gz (default: $IMDB_ARCHIVE)")
    parser.add_argument("--repeats", type=int, default=1, help="cold runs of each family (default 1)")
    args = parser.parse_args(argv)
    if not args.archive:
        parser.error("give the archive path or set IMDB_ARCHIVE")
    compare_families(str(Path(args.archive).resolve()), args.repeats)


if __name__ == "__main__":
    main()
