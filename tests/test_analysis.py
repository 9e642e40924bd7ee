"""The sweep analysis on made-up jobs: whatever was swept, the table, report and figures follow its axes (and,
last, analyze_sweep on a store written by hand, as a search with a pruned trial leaves it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import analysis


@pytest.fixture(autouse=True)
def close_figures():
    yield
    from matplotlib import pyplot as plt

    plt.close("all")  # each analysis draws its figures; a user's process would log and close them


def curve(epochs: int, lowest: int, accuracy: float, seconds: float = 0.5) -> pd.DataFrame:
    """A history whose validation loss is lowest at epoch `lowest` (still falling if beyond `epochs`) and whose
    validation accuracy peaks there at `accuracy`."""
    epoch = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": epoch, "loss": 0.6 / epoch, "accuracy": 0.7 + 0.25 * (1 - 1 / epoch),
                         "val_loss": 0.3 + 0.01 * (epoch - lowest) ** 2,
                         "val_accuracy": accuracy - 0.001 * (epoch - lowest) ** 2, "epoch_seconds": seconds})


def sweep(jobs: list[tuple[dict, pd.DataFrame, float]], **extra) -> tuple[list[dict], dict]:
    """Rows and histories of jobs given as (settings, history, test accuracy); named as the sweep names them."""
    rows, histories = [], {}
    for number, (settings, history, test_accuracy) in enumerate(jobs):
        run_id = f"run-{number}"
        name = ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in settings.items() if key != "fit.epochs"
                        or len(settings) == 1) or f"job-{number}"
        histories[run_id] = history
        rows.append(analysis.job_row(name, run_id, {"fit.epochs": len(history), **settings}, history, test_accuracy,
                                     fit_seconds=2.0, parameters=160_033, model_size_mb=0.7, **extra))
    return rows, histories


def test_a_sweep_over_learning_rate_and_dropout_speaks_of_those_two_and_nothing_else():
    jobs = [({"build.learning_rate": lr, "build.dropout_rate": dropout},
             curve(12, 4 if lr == "0.003" else 8, 0.80 + float(dropout) / 10 + float(lr) * 10), 0.79)
            for lr in ("0.001", "0.003") for dropout in ("0.0", "0.5")]
    rows, histories = sweep(jobs)
    axes = {"build.learning_rate": "0.001,0.003", "build.dropout_rate": "0.0,0.5"}
    result = analysis.analyze(axes, rows, histories, failed=[])
    table = result.table
    assert list(table.columns[:3]) == ["job", "build.learning_rate", "build.dropout_rate"]
    assert sorted(zip(table["build.learning_rate"], table["build.dropout_rate"])) == [
        (0.001, 0.0), (0.001, 0.5), (0.003, 0.0), (0.003, 0.5)]
    assert {"pruned", "epochs_trained", "fit.epochs"} <= set(table.columns) and not table["pruned"].any()
    assert result.axes == ["build.learning_rate", "build.dropout_rate"]
    report = result.report
    assert "`build.learning_rate` x `build.dropout_rate`" in report
    assert not re.search("hidden|units", report, re.IGNORECASE)
    assert "### `build.learning_rate` (0.001,0.003)" in report and "### `build.dropout_rate` (0.0,0.5)" in report
    # the overfitting finding, from the curves (no budget axis): lowest at epochs 4 and 8, then rising
    assert "**Validation loss is lowest at epoch 6**" in report and "they overfit after epoch 6" in report
    assert "Larger `build.learning_rate` overfits sooner: build.learning_rate=0.003 reaches its lowest validation " \
           "loss at epoch 4, build.learning_rate=0.001 at epoch 8" in report
    assert "highest at 0.003 (0.8550) and lowest at 0.001 (0.8350)" in report  # per value: the mean of its 2 jobs
    assert "`learning_rate=0.003,dropout_rate=0.5`" in report.split("**Best job**")[1].splitlines()[0]
    assert result.headline["median_min_val_loss_epoch"] == 6
    assert set(result.figures) == {"val_loss_by_build.learning_rate.png", "val_loss_by_build.dropout_rate.png",
                                   "best_val_accuracy_by_build.learning_rate.png",
                                   "best_val_accuracy_by_build.dropout_rate.png"}
    legend = [text.get_text() for text in result.figures["val_loss_by_build.learning_rate.png"].axes[0].get_legend().get_texts()]
    assert legend == ["build.learning_rate=0.001", "build.learning_rate=0.003"]


def test_the_overfit_grid_keeps_its_numbers_under_the_axes_names():
    """hidden units x epoch budget, as experiment=overfit_sweep: the shorter budgets' curves are the longest's start."""
    lowest = {8: 9, 16: 7}
    test = {(8, 5): 0.80, (8, 10): 0.84, (8, 15): 0.83, (16, 5): 0.81, (16, 10): 0.85, (16, 15): 0.82}
    jobs = [({"build.hidden_units": str(hidden), "fit.epochs": epochs},
             curve(epochs, lowest[hidden], 0.85 + hidden / 1000), test[hidden, epochs])
            for hidden in (8, 16) for epochs in (5, 10, 15)]
    rows, histories = sweep(jobs)
    early = {"job": "early_stopping,hidden_units=16", "stopped_epoch": 9, "best_epoch": 7, "test_accuracy": 0.86}
    result = analysis.analyze({"build.hidden_units": "8,16", "fit.epochs": "5,10,15"}, rows, histories, [], early)
    assert sorted(zip(result.table["build.hidden_units"], result.table["fit.epochs"])) == sorted(test)
    report = result.report
    assert "**Validation loss is lowest at epoch 8** (median over 2 jobs, each setting at its longest budget); " \
           "per setting: build.hidden_units=8 -> epoch 9; build.hidden_units=16 -> epoch 7." in report
    # per hidden size, the best budget's test accuracy minus the largest's: 1 and 3 points, median 2
    assert "**Training to 15 epochs instead of the best budget costs 2.00 points of test accuracy** (median over 2 " \
           "settings of build.hidden_units)" in report
    assert result.headline["max_epochs_cost_points"] == pytest.approx(2.0)
    assert "Larger `build.hidden_units` overfits sooner: build.hidden_units=16 reaches its lowest validation loss at " \
           "epoch 7, build.hidden_units=8 at epoch 9" in report
    assert "**Early stopping** (`early_stopping,hidden_units=16`) stopped at epoch 9 and kept epoch 7's weights: test " \
           "accuracy 0.8600, +1.00 points against the sweep's best job" in report
    # the best job by validation accuracy: hidden 16 (0.866 at epoch 7), trained 10 or 15 epochs; the first wins
    best = result.table.set_index("run_id").loc[result.best_run]
    assert (best["build.hidden_units"], best["fit.epochs"]) == (16, 10) and result.headline["best_test_accuracy"] == 0.85
    assert {"val_loss_by_build.hidden_units.png", "test_accuracy_by_fit.epochs.png"} <= set(result.figures)
    # along the budget axis, the lowest-loss epoch is each budget's own (capped by it)
    assert "### `fit.epochs` (5,10,15)" in report and "validation loss is lowest soonest at 5 (epoch 5)" in report


def test_a_categorical_axis_is_grouped_by_value_and_a_curve_still_falling_is_no_overfitting():
    jobs = [({"build.optimizer": optimizer}, curve(6, lowest, accuracy), 0.8)
            for optimizer, lowest, accuracy in (("adam", 9, 0.84), ("sgd", 20, 0.70))]
    rows, histories = sweep(jobs)
    result = analysis.analyze({"build.optimizer": "adam,sgd"}, rows, histories, [])
    assert result.table["build.optimizer"].tolist() == ["adam", "sgd"]
    assert "It is still falling at the last epoch of every job: no overfitting within these budgets." in result.report
    assert "Best validation accuracy is highest at adam" in result.report and "overfits" not in result.report
    assert set(result.figures) == {"val_loss_by_build.optimizer.png", "best_val_accuracy_by_build.optimizer.png"}


def test_seeds_are_repeats_aggregated_as_mean_and_spread_not_a_setting():
    jobs = []
    for lr, base in (("0.001", 0.80), ("0.01", 0.83)):
        for seed, wobble in ((1, -0.01), (2, 0.0), (3, 0.04 if lr == "0.001" else 0.01)):
            jobs.append(({"build.learning_rate": lr, "seed": str(seed)}, curve(8, 5, base + wobble), 0.8 + wobble))
    rows, histories = sweep(jobs)
    result = analysis.analyze({"build.learning_rate": "0.001,0.01", "seed": "1,2,3"}, rows, histories, [])
    report = result.report
    assert "seed" in result.table.columns and "## Over seeds" in report
    mean, spread = np.mean([0.82, 0.83, 0.84]), np.std([0.82, 0.83, 0.84])
    assert f"| 0.01 | 3 | {mean:.4f} | {spread:.4f} |" in report
    # the best setting by mean validation accuracy (0.01), though lr 0.001's seed 3 validates best of all jobs
    assert f"**Best setting** (highest mean validation accuracy over 3 seeds): build.learning_rate=0.01, validation " \
           f"accuracy {mean:.4f} ± {spread:.4f}" in report
    best = result.table.set_index("run_id").loc[result.best_run]
    assert (best["build.learning_rate"], best["seed"]) == (0.01, 3)
    assert "### `seed`" not in report and not any("seed" in name for name in result.figures)
    assert "per setting (median over seeds): build.learning_rate=0.001 -> epoch 5; build.learning_rate=0.01 -> " \
           "epoch 5" in report


def test_a_continuous_search_axis_is_reported_in_thirds_with_its_rank_correlation():
    rates = [0.0004, 0.0007, 0.001, 0.002, 0.003, 0.005, 0.007, 0.009, 0.012]
    jobs = [({"build.learning_rate": str(rate)}, curve(10, 9 - number // 2, 0.80 + number / 100), 0.8)
            for number, rate in enumerate(rates)]
    rows, histories = sweep(jobs)
    result = analysis.analyze({"build.learning_rate": "tag(log, interval(0.0003, 0.02))"}, rows, histories, [])
    report = result.report
    assert "| 0.0004-0.001 | 3 |" in report and "| 0.007-0.012 | 3 |" in report
    assert "Its values are grouped in thirds, by rank. Rank correlation (Spearman) with the value: best validation " \
           "accuracy +1.00, epoch of the lowest validation loss -0.98" in report
    legend = [t.get_text() for t in result.figures["val_loss_by_build.learning_rate.png"].axes[0].get_legend().get_texts()]
    assert legend == ["build.learning_rate=0.0004-0.001", "build.learning_rate=0.002-0.005",
                      "build.learning_rate=0.007-0.012"]


def test_pruned_jobs_are_listed_with_the_time_saved_and_left_out_of_the_findings():
    rows, histories = sweep([({"build.dropout_rate": "0.1"}, curve(10, 6, 0.85), 0.84),
                             ({"build.dropout_rate": "0.3"}, curve(10, 8, 0.86), 0.85)])
    for number, (dropout, trained, seconds) in enumerate((("0.2", 3, 0.4), ("0.4", 5, 1.0))):
        run_id, history = f"pruned-{number}", curve(trained, 1, 0.99, seconds)  # cut short: "overfits" at epoch 1
        histories[run_id] = history
        rows.append(analysis.job_row(f"dropout_rate={dropout}", run_id, {"build.dropout_rate": dropout, "fit.epochs": 10},
                                     history, 0.9, pruned=True, trial=number + 2, epoch_seconds=seconds))
    result = analysis.analyze({"build.dropout_rate": "interval(0.0, 0.5)"}, rows, histories, [])
    table = result.table.set_index("job")
    assert table["pruned"].tolist() == [False, True, False, True]
    assert table.loc["dropout_rate=0.4", "epochs_trained"] == 5 and table.loc["dropout_rate=0.4", "fit.epochs"] == 10
    saved = (10 - 3) * 0.4 + (10 - 5) * 1.0
    assert result.headline["jobs_pruned"] == 2 and result.headline["pruning_saved_seconds"] == pytest.approx(saved)
    assert "**2 of 4 jobs were pruned**" in result.report and "`dropout_rate=0.2` (trial 2) 3 of 10" in result.report
    assert f"Pruning saved about {saved:.0f} s of training" in result.report
    assert result.headline["median_min_val_loss_epoch"] == 7  # the two whole curves only
    assert result.table.set_index("run_id").loc[result.best_run, "job"] == "dropout_rate=0.3"


def test_no_finished_job_is_a_report_that_says_so():
    result = analysis.analyze({"build.hidden_units": "4,0"}, [], {}, [{"job": "hidden_units=0", "run_id": "x",
                                                                      "error": "build.hidden_units=0 is not allowed"}])
    assert "No job finished." in result.report and "is not allowed" in result.report and result.best_run is None
    assert list(result.table.columns[:2]) == ["job", "build.hidden_units"]


# -- pipeline.sweep.analyze_sweep: the same analysis, read from and written to a store ------------------
def test_analyze_sweep_reads_the_axes_and_pruned_trials_back_from_the_store(tmp_path):
    """A search as the store holds it (parent params sweep.<key>, children with their params, curves and tags):
    the analysis written to the parent has a column per searched key, the pruned trial and the time it saved."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from pipeline import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("search")
    parent = client.create_run(experiment, run_name="sweep optimizer,dropout_rate").info.run_id
    client.log_batch(parent, params=[Param("sweep.build.optimizer", "choice(adam, sgd)"),
                                     Param("sweep.build.dropout_rate", "interval(0.0, 0.5)")])
    trials = [("adam", "0.1", 5, 6, False), ("sgd", "0.2", 2, 9, True), ("adam", "0.4", 5, 3, False)]
    for number, (optimizer, dropout, trained, lowest, pruned) in enumerate(trials):
        history = curve(trained, lowest, 0.8 + number / 100, seconds=1.5)
        run = client.create_run(experiment, run_name=f"optimizer={optimizer},dropout_rate={dropout}",
                                tags={"mlflow.parentRunId": parent, "search.trial": str(number),
                                      "search.pruned": str(pruned).lower(), "seconds.fit": "8.0"}).info.run_id
        metrics = [Metric(name, float(row[name]), 0, int(row["epoch"])) for _, row in history.iterrows()
                   for name in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds")]
        metrics += [Metric("epochs_trained", trained, 0, 0)] + ([] if pruned else [Metric("test_accuracy", 0.8, 0, 0)])
        client.log_batch(run, metrics=metrics, params=[
            Param("build.optimizer", optimizer), Param("build.dropout_rate", dropout), Param("fit.epochs", "5"),
            Param("seed", "42"), Param("build.family", "tutorial")])
        client.set_terminated(run, "FINISHED")
    failed = client.create_run(experiment, run_name="optimizer=sgd,dropout_rate=0.3",
                               tags={"mlflow.parentRunId": parent, "error": "ValueError: boom"}).info.run_id
    client.set_terminated(failed, "FAILED")

    sweep.analyze_sweep(parent)
    table = pd.read_csv(client.download_artifacts(parent, "analysis/jobs.csv", str(tmp_path)))
    assert list(table.columns[:3]) == ["job", "build.optimizer", "build.dropout_rate"]  # in the jobs' names' order
    assert table[["build.optimizer", "build.dropout_rate", "pruned", "epochs_trained", "trial"]].values.tolist() == [
        ["adam", 0.1, False, 5, 0], ["adam", 0.4, False, 5, 2], ["sgd", 0.2, True, 2, 1]]
    report = Path(client.download_artifacts(parent, "analysis/report.md", str(tmp_path))).read_text()
    assert "**1 of 3 jobs were pruned**" in report and "`optimizer=sgd,dropout_rate=0.2` (trial 1) 2 of 5" in report
    assert "boom" in report and "hidden" not in report
    metrics = client.get_run(parent).data.metrics
    assert metrics["jobs_pruned"] == 1 and metrics["pruning_saved_seconds"] == pytest.approx((5 - 2) * 1.5)
    assert metrics["jobs_failed"] == 1 and metrics["median_min_val_loss_epoch"] == 4  # the whole curves: 5 and 3
    assert client.get_run(parent).data.tags["sweep.best_job"] == "optimizer=adam,dropout_rate=0.4"


def test_every_run_measures_what_training_past_its_best_epoch_cost():
    """Each run logs its best and its last epoch's test accuracy (docs/checkpoints.md): the report gives the
    difference job by job, and a budget's cost is read from the last epoch's, not from the served best."""
    jobs, extra = [], []
    for hidden, epochs, best, last in ((8, 10, 0.86, 0.84), (8, 20, 0.86, 0.83), (16, 10, 0.87, 0.86), (16, 20, 0.87, 0.82)):
        jobs.append(({"build.hidden_units": str(hidden), "fit.epochs": epochs}, curve(epochs, 6, 0.86), best))
        extra.append({"best_epoch": 6, "last_epoch": epochs, "best_epoch_test_accuracy": best,
                      "last_epoch_test_accuracy": last})
    rows, histories = sweep(jobs)
    for row, more in zip(rows, extra):
        row.update(more)
    result = analysis.analyze({"build.hidden_units": "8,16", "fit.epochs": "10,20"}, rows, histories, [])
    report = result.report
    # points per job: 2, 3, 1, 5 -> median 2.5, from +1 to +5
    assert "**Measured on every run: stopping at the best epoch instead of the last gains +2.50 points of test " \
           "accuracy** (median over 4 jobs, each run's best-epoch model against its last-epoch model; from +1.00 " \
           "to +5.00)." in report
    assert result.headline["best_vs_last_epoch_points"] == pytest.approx(2.5)
    # the longest budget's cost, from the last epochs' accuracies (the served ones are equal across budgets):
    # hidden 8: 0.84 - 0.83 = 1 point; hidden 16: 0.86 - 0.82 = 4 points; median 2.5
    assert result.headline["max_epochs_cost_points"] == pytest.approx(2.5)
    assert {"best_epoch_test_accuracy", "last_epoch_test_accuracy"} <= set(result.table.columns)
