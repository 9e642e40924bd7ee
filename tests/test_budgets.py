"""A sweep's fit.epochs budgets recorded from one training (pipeline/budgets.py, pipeline/tracking/budgets.py):
which jobs share, and a budget's record equal to a training of that budget alone. (Sweeps run with sharing on by
default: tests/test_sweeps.py, test_resume.py and test_reliability.py run it on every launcher.)"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from pipeline import budgets, config
from pipeline.config import CONF
from tests.conftest import compose_config, tiny_overrides
from tests.helpers import CURVES

GRID = [[f"build.hidden_units={units}", f"fit.epochs={epochs}"] for units in (4, 8) for epochs in (3, 1, 2)]


def planned(tiny_archive, tmp_path, *settings: str) -> list[list[str]]:
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # (once: each compose then takes ms)
        return budgets.plan(GRID, lambda job: config.load(compose(
            config_name="config", overrides=[*tiny_overrides(tiny_archive, tmp_path), *settings, *job])))


def test_jobs_that_differ_only_in_their_budget_share_one_training_unless_something_reads_the_budget(
        tiny_archive, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.budgets")
    shared = planned(tiny_archive, tmp_path)
    assert shared == [[f"build.hidden_units={units}", "fit.epochs=3", f"+hydra.job.env_set.{budgets.BUDGETS}='1,2,3'"]
                      for units in (4, 8)]  # each setting once, at its longest budget, told all three
    assert "build.hidden_units=8 trains once, to 3 epochs, for fit.epochs=1,2,3" in caplog.text
    assert "(3 epochs not repeated" in caplog.text
    for settings, why in ((["sweep.share_budgets=false"], "sweep.share_budgets=false"),
                          (["fit=early_stopping"], "fit.early_stopping.enabled=true (early stopping reads the budget"),
                          (["fit.checkpoint_every=${fit.epochs}"], "fit.checkpoint_every differs between the budgets "
                                                                     "(1 at 1, 2 at 2, 3 at 3): it reads fit.epochs"),
                          (["build.embedding_dim=0"], "its settings do not compose (build.embedding_dim=0 is not allowed")):
        caplog.clear()
        alone = planned(tiny_archive, tmp_path, *settings)
        assert sorted(map(tuple, alone)) == sorted(map(tuple, GRID)), settings  # every job, as it was
        assert f"build.hidden_units=4 trains fit.epochs=1,2,3 separately: {why}" in caplog.text, caplog.text
    assert budgets.with_budget(["build.hidden_units=4", "fit.epochs=3"], "1") == ["build.hidden_units=4", "fit.epochs=1"]


@pytest.mark.slow
def test_each_budget_recorded_from_a_shared_training_equals_a_training_of_that_budget_alone(tiny_archive, tmp_path):
    """Same seed: the budgets of one training (dropout on, so that a random stream disturbed by a budget's record
    would show) against each budget trained alone, read back from the store to its last digit."""
    from pipeline.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config([*tiny_overrides(tiny_archive, tmp_path), "build.dropout_rate=0.5", "fit.epochs=3"])

    def at(epochs: int, name: str):
        return replace(cfg, fit=replace(cfg.fit, epochs=epochs), tracking=replace(cfg.tracking, run_name=name))

    train(at(3, "shared,epochs=3"), budgets=[at(1, "shared,epochs=1"), at(2, "shared,epochs=2")])
    for epochs in (1, 3):
        train(at(epochs, f"alone,epochs={epochs}"))
    client = MlflowClient(uri)
    runs = {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name("imdb-sentiment")
                                                                  .experiment_id])}
    first = runs["shared,epochs=1"]
    for epochs in (1, 2, 3):
        run = runs[f"shared,epochs={epochs}"]
        assert run.info.status == "FINISHED" and run.data.params["fit.epochs"] == str(epochs)
        assert run.data.tags["pipeline.training"] == first.info.run_id  # the run the training started in
        assert run.data.tags["pipeline.training.budgets"] == "1,2,3"
        assert f"started in run {first.info.run_id}" in run.data.tags["mlflow.note.content"]
        assert run.info.start_time == first.info.start_time  # each budget's run starts with the training
        assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "epoch_seconds")) == list(
            range(1, epochs + 1))
        models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
        assert any(m.name.startswith(f"last-epoch-{epochs}") or m.name.startswith(f"best+last-epoch-{epochs}")
                   for m in models), [m.name for m in models]
        if epochs == 2:
            continue
        alone = runs[f"alone,epochs={epochs}"]
        assert "pipeline.training" not in alone.data.tags
        for curve in CURVES:  # every epoch's values, the same numbers
            assert [(p.step, p.value) for p in sorted(client.get_metric_history(run.info.run_id, curve),
                                                      key=lambda p: p.step)] == \
                   [(p.step, p.value) for p in sorted(client.get_metric_history(alone.info.run_id, curve),
                                                      key=lambda p: p.step)], (epochs, curve)
        scored = {key: value for key, value in alone.data.metrics.items() if key.startswith(("test_", "best", "last."))}
        assert len(scored) > 10 and {key: run.data.metrics[key] for key in scored} == scored
        assert {k: v for k, v in run.data.params.items() if k != "tracking.run_name"} == \
               {k: v for k, v in alone.data.params.items() if k != "tracking.run_name"}
        names = sorted(m.name.split(" of ")[0] for m in models)
        alone_models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{alone.info.run_id}'")
        assert names == sorted(m.name.split(" of ")[0] for m in alone_models)
