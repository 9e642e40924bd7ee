"""The sweep analysis on made-up jobs: whatever was swept, the table, report and figures follow its axes (and,
last, analyze_sweep on a store written by hand, as a search with a pruned trial leaves it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import analysis
from tests.helpers import store_in


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
    # per value: the mean of its 2 jobs; a full grid: the other axis is the same on both sides, a finding
    assert "highest at 0.003 (0.8550, 2 jobs) and lowest at 0.001 (0.8350, 2 jobs), as the mean over each value's " \
           "jobs. Validation" in report
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
    # runs from before checkpoints: test_accuracy is the last epoch's; per budget, the mean of its 2 jobs:
    # 5 -> 0.805, 10 -> 0.845, 15 -> 0.825
    assert "**Training to 15 epochs instead of 10 costs the last epoch's model 2.00 points of test accuracy** (0.8250 " \
           "against 0.8450): the mean over the jobs of each budget (2 jobs vs 2); 10 epochs is where the last epoch's " \
           "model scores best. Setting by setting (build.hidden_units), the last epoch's model scores lower at 15 in 2 " \
           "of 2." in report
    assert result.headline["longest_vs_best_budget_points.last_epoch_model"] == pytest.approx(-2.0)
    # at each hidden size's longest budget: one job per side, so no trend is claimed
    assert "overfits sooner" not in report
    assert "build.hidden_units=16 reaches its lowest validation loss at epoch 7, build.hidden_units=8 at epoch 9 (the " \
           "median of 1 job vs 1, each setting's longest curve)" in report
    assert "Not a finding: one job per side" in report.split("build.hidden_units=8 at epoch 9")[1].splitlines()[0]
    assert "**Early stopping** (`early_stopping,hidden_units=16`) stopped at epoch 9 and kept epoch 7's weights: test " \
           "accuracy 0.8600 (that epoch's model), +1.00 points against the last epoch's model of the sweep's best job, " \
           "with no epoch budget to choose. Not a finding: one job per side." in report
    # the best job by validation accuracy: hidden 16 (0.866 at epoch 7), trained 10 or 15 epochs; the first wins
    best = result.table.set_index("run_id").loc[result.best_run]
    assert (best["build.hidden_units"], best["fit.epochs"]) == (16, 10)
    assert result.headline["best_job.last_epoch_model.test_accuracy"] == 0.85
    assert {"val_loss_by_build.hidden_units.png", "test_accuracy_by_fit.epochs.png"} <= set(result.figures)
    # along the budget axis, the lowest-loss epoch is each budget's own (capped by it)
    assert "### `fit.epochs` (5,10,15)" in report and "soonest at 5 (epoch 5, 2 jobs), as the median" in report


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
    from mlflow.entities import Metric, Param

    from pipeline import sweep

    uri = store_in(tmp_path)
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


def table_under(report: str, heading: str) -> pd.DataFrame:
    """The first Markdown table after `heading` in a report, as a reader sees it (cells as text)."""
    lines = report.split(heading, 1)[1].splitlines()
    rows = [line for line in lines[lines.index(next(line for line in lines if line.startswith("|"))):]]
    rows = rows[:next((i for i, line in enumerate(rows) if not line.startswith("|")), len(rows))]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return pd.DataFrame(cells[2:], columns=cells[0])


def budget_sweep(results: dict[tuple[int, int], tuple[float, float]]):
    """hidden units x epoch budget, each run's best (epoch 6, served) and last epoch tested: {(hidden, epochs):
    (best-epoch test accuracy, last-epoch test accuracy)}."""
    jobs = [({"build.hidden_units": str(hidden), "fit.epochs": epochs}, curve(epochs, 6, 0.86), best)
            for (hidden, epochs), (best, _) in results.items()]
    rows, histories = sweep(jobs)
    for row, ((_, epochs), (best, last)) in zip(rows, results.items()):
        row.update(best_epoch=6, last_epoch=epochs, best_epoch_test_accuracy=best, last_epoch_test_accuracy=last,
                   served="best")
    return analysis.analyze({"build.hidden_units": "8,16", "fit.epochs": "10,20"}, rows, histories, [])


def test_a_budget_sweep_says_which_model_each_cost_measures_and_its_table_and_figure_agree():
    """Each run logs its best and its last epoch's test accuracy (docs/checkpoints.md). The served best-epoch model
    gains from a longer budget while the last epoch's model loses: the headline says both, each number is the one
    the fit.epochs table and figure show, and the jobs on each side are named."""
    result = budget_sweep({(8, 10): (0.86, 0.84), (8, 20): (0.87, 0.83), (16, 10): (0.87, 0.86), (16, 20): (0.88, 0.82)})
    report = result.report
    assert "Test accuracy is measured on the best epoch's model (the one served) and the last epoch's model" in report
    # per budget, the mean of its 2 jobs: best epoch 0.865 -> 0.875, last epoch 0.85 -> 0.825
    assert "**Training to 20 epochs instead of 10 costs the last epoch's model 2.50 points of test accuracy** (0.8250 " \
           "against 0.8500) and **gains the best epoch's model (the one served) 1.00 points of test accuracy** (0.8750 " \
           "against 0.8650): the mean over the jobs of each budget (2 jobs vs 2)" in report
    table = table_under(report, "### `fit.epochs`").set_index("fit.epochs")
    assert table.loc["10", ["jobs", "best_epoch_test_accuracy", "last_epoch_test_accuracy"]].tolist() == ["2", "0.8650", "0.8500"]
    assert table.loc["20", ["jobs", "best_epoch_test_accuracy", "last_epoch_test_accuracy"]].tolist() == ["2", "0.8750", "0.8250"]
    assert result.headline["longest_vs_best_budget_points.last_epoch_model"] == pytest.approx(-2.5)
    assert result.headline["longest_vs_best_budget_points.best_epoch_model"] == pytest.approx(1.0)
    assert "max_epochs_cost_points" not in result.headline and "best_test_accuracy" not in result.headline
    # the figure: a solid and a dashed line per hidden size, and the means the headline quotes, in black
    lines = {line.get_label(): line for line in result.figures["test_accuracy_by_fit.epochs.png"].axes[0].lines}
    assert list(lines["mean, best epoch"].get_ydata()) == pytest.approx([0.865, 0.875])
    assert list(lines["mean, last epoch"].get_ydata()) == pytest.approx([0.85, 0.825])
    assert list(lines["build.hidden_units=16, last epoch"].get_ydata()) == pytest.approx([0.86, 0.82])
    assert lines["build.hidden_units=16, last epoch"].get_linestyle() == "--"
    # points per job, best minus last: 2, 4, 1, 6 -> median 3, from +1 to +6
    assert "**Measured on every run: stopping at the best epoch instead of the last gains +3.00 points of test " \
           "accuracy** (median over 4 jobs, each run's best-epoch model against its last-epoch model; from +1.00 " \
           "to +6.00)." in report
    assert result.headline["median_best_vs_last_epoch_points"] == pytest.approx(3.0)

    # a variant: the last epoch's model too is best at the longest budget (no overfitting in these budgets)
    result = budget_sweep({(8, 10): (0.86, 0.84), (8, 20): (0.87, 0.85), (16, 10): (0.87, 0.86), (16, 20): (0.88, 0.87)})
    assert "**The last epoch's model scores best at the longest budget, 20 epochs** (mean test accuracy 0.8600, 2 " \
           "jobs): training longer costs it nothing within these budgets." in result.report
    assert "costs" not in result.report.split("## Along each axis")[0].replace("costs it nothing", "")
    assert result.headline["longest_vs_best_budget_points.last_epoch_model"] == 0


def test_a_difference_resting_on_one_job_per_side_or_on_axes_that_also_differ_is_no_finding():
    """A search of three trials over three axes: each axis's ends are one job each, and the other two axes move
    with it; the report gives the numbers and says why they are no finding (no "overfits sooner")."""
    jobs = [({"build.learning_rate": lr, "build.dropout_rate": dropout, "build.hidden_units": hidden},
             curve(10, lowest, accuracy), 0.84)
            for lr, dropout, hidden, lowest, accuracy in (("0.001", "0.1", "8", 8, 0.85), ("0.003", "0.3", "16", 6, 0.86),
                                                          ("0.01", "0.4", "32", 4, 0.87))]
    rows, histories = sweep(jobs)
    axes = {"build.learning_rate": "interval(0.0001, 0.1)", "build.dropout_rate": "interval(0.0, 0.5)",
            "build.hidden_units": "choice(8, 16, 32)"}
    report = analysis.analyze(axes, rows, histories, []).report
    assert "overfits sooner" not in report and "overfits later" not in report
    assert "One seed: no difference here is measured against the spread between seeds." in report
    assert "- `build.hidden_units` and the epoch of lowest validation loss: build.hidden_units=32 reaches its lowest " \
           "validation loss at epoch 4, build.hidden_units=8 at epoch 8 (the median of 1 job vs 1" in report
    assert "Not a finding: one job per side (over all 3 curves, the epoch's rank correlation with " \
           "`build.hidden_units` is -1.00); confounded: `build.learning_rate`, `build.dropout_rate` also differ " \
           "between the two sides." in report
    assert "Best validation accuracy is highest at 32 (0.8700, 1 job) and lowest at 8 (0.8500, 1 job), as the mean " \
           "over each value's jobs. Not a finding: one job per side; confounded:" in report
    assert report.count("Not a finding") == 9  # per axis: its epoch trend, its best and worst accuracy, epoch


def test_one_seed_has_no_spread_and_a_family_below_its_own_budget_is_said_to_be():
    """`build=tutorial,nbsvm fit.epochs=3` with one seed: the tutorial's model trained 3 of its own 40 epochs."""
    rows, histories = [], {}
    for family, accuracy, test, own in (("tutorial", 0.80, 0.72, 40), ("nbsvm", 0.90, 0.8939, 3)):
        histories[family] = curve(3, 5, accuracy)
        rows.append(analysis.job_row(f"build={family}", family, {"build": family, "fit.epochs": 3}, histories[family],
                                     test, family=family, family_epochs=own, served="best", fit_seconds=2.0,
                                     parameters=100, model_size_mb=1.5))
    result = analysis.analyze({"build": "tutorial,nbsvm"}, rows, histories, [])
    report = result.report
    assert "±" not in report and "over 1 runs" not in report
    assert "test accuracy of the served (best-epoch) model 0.8939 (one run: no spread)" in report
    assert "- **Against the tutorial's model**: +17.39 points of test accuracy of the served (best-epoch) model (0.8939 " \
           "against 0.7200, one run each)" in report
    assert "Not a finding: one job per side; the tutorial's model trained 3 of its own 40 epochs." in report
    assert "- **Compared below their own epoch budget** (their conf/build file's `fit.epochs`): tutorial 3 of its 40." \
           in report and "nbsvm 3 of" not in report
    assert result.ranking.set_index("family")["own_epochs"].to_dict() == {"nbsvm": 3, "tutorial": 40}
    assert result.ranking["test_accuracy_std"].isna().all()  # one run: no spread, not 0
    assert table_under(report, "## Ranking")["test_accuracy_std"].tolist() == ["–", "–"]
    assert result.headline["best_family.served_model.points_vs_tutorial"] == pytest.approx(17.39)


def test_a_difference_within_the_spread_between_seeds_is_no_finding():
    jobs = []
    for lr, lowest_by_seed in (("0.001", (5, 9, 7)), ("0.01", (6, 8, 4))):  # epochs 7 vs 6, each spread 1.6
        for seed, lowest in zip((1, 2, 3), lowest_by_seed):
            jobs.append(({"build.learning_rate": lr, "seed": str(seed)}, curve(10, lowest, 0.85), 0.8))
    rows, histories = sweep(jobs)
    report = analysis.analyze({"build.learning_rate": "0.001,0.01", "seed": "1,2,3"}, rows, histories, []).report
    assert "build.learning_rate=0.01 reaches its lowest validation loss at epoch 6, build.learning_rate=0.001 at epoch " \
           "7 (the median of 3 jobs vs 3" in report and "Not a finding: within the spread between seeds." in report
    assert "overfits sooner" not in report
    # a variant beyond the spread: 9 vs 4, each spread 0.8: a finding
    jobs = [({"build.learning_rate": lr, "seed": str(seed)}, curve(12, lowest + seed % 2, 0.85), 0.8)
            for lr, lowest in (("0.001", 8), ("0.01", 3)) for seed in (1, 2, 3)]
    rows, histories = sweep(jobs)
    report = analysis.analyze({"build.learning_rate": "0.001,0.01", "seed": "1,2,3"}, rows, histories, []).report
    assert "- Larger `build.learning_rate` overfits sooner: build.learning_rate=0.01 reaches its lowest validation " \
           "loss at epoch 4, build.learning_rate=0.001 at epoch 9 (the median of 3 jobs vs 3" in report


def test_the_figures_leave_pyplot_and_its_backend_alone():
    """A notebook's backend and open figures are its own: the analysis draws on Figures of its own."""
    import matplotlib
    from matplotlib import pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend the analysis would have replaced
    try:
        result = budget_sweep({(8, 10): (0.86, 0.84), (8, 20): (0.87, 0.83), (16, 10): (0.87, 0.86), (16, 20): (0.88, 0.82)})
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
        assert len(result.figures) == 4 and all(figure.axes[0].has_data() for figure in result.figures.values())
    finally:
        matplotlib.use(before)
