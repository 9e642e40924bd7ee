"""The Optuna sweeper's settings, checked before a search starts: the search space as written in Hydra's sweep
syntax, where the study is kept, and the messages a user gets for a bad setting or a missing Optuna.
(The search itself, pruning and resume: tests/test_sweeps.py.)"""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from pipeline import search
from tests.conftest import CONF

optuna = pytest.importorskip("optuna")


def sweeper(**changes):
    settings = OmegaConf.load(CONF / "hydra" / "sweeper" / "optuna.yaml")
    for key, value in changes.items():
        OmegaConf.update(settings, key, value, merge=False)
    return settings


def test_the_search_space_is_hydras_sweep_syntax_as_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = search.search_space([
        "build.hidden_units=choice(8, 16, 32)", "build.embedding_dim=range(8, 33, 8)",
        "build.dropout_rate=interval(0.0, 0.5)", "build.learning_rate=tag(log, interval(0.0003, 0.01))",
        "build.hidden_layers=range(1, 4)", "fit.epochs=10", "build.hidden_units=choice(4, 64)"])
    assert space == {
        "build.hidden_units": CategoricalDistribution([4, 64]),  # the command line's sweep replaces the config's
        "build.embedding_dim": IntDistribution(8, 32, step=8),  # range's stop excluded, as in Hydra
        "build.dropout_rate": FloatDistribution(0.0, 0.5),
        "build.learning_rate": FloatDistribution(0.0003, 0.01, log=True),
        "build.hidden_layers": IntDistribution(1, 3)}
    assert fixed == ["fit.epochs=10"]  # a plain value goes to every trial


def test_the_study_is_kept_beside_the_tracking_store_unless_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert search.storage_url(None, "sqlite:////data/runs/mlflow.db") == "sqlite:////data/runs/optuna.db"
    assert search.storage_url(None, "http://tracking:5000") == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert search.storage_url("studies/imdb.db", "sqlite:////x/mlflow.db") == f"sqlite:///{tmp_path / 'studies' / 'imdb.db'}"
    assert search.storage_url("postgresql://db/optuna", "sqlite:////x/mlflow.db") == "postgresql://db/optuna"


@pytest.mark.parametrize("changes, message", [
    ({"pruner": "mean"}, "hydra.sweeper.pruner='mean' is not allowed: one of median, successive_halving, none"),
    ({"pruners.median": {"n_warmup": 3}}, "hydra.sweeper.pruners.median={'n_warmup': 3}"),
    ({"n_trials": 0}, "hydra.sweeper.n_trials=0 is not allowed"),
    ({"direction": "up"}, "hydra.sweeper.direction='up' is not allowed: maximize or minimize"),
    ({"params": {"build.hidden_units": "range(8, 8)"}}, "build.hidden_units=range(8, 8): the range is empty"),
])
def test_a_bad_setting_is_refused_before_the_search_starts(changes, message):
    with pytest.raises(ValueError) as refused:
        search.check(sweeper(**changes))
    assert message in str(refused.value)


def test_the_configured_search_passes_the_check():
    search.check(sweeper(params={"build.hidden_units": "choice(8, 16)"}))


def test_without_optuna_the_message_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'imdb-pipeline\[search\]' \(in the project's checkout: pip install "
                                          r"-e '\.\[search\]'\)"):  # (an installed package has no '.' to install)
        search.check(sweeper())


def test_the_same_choices_typed_in_another_order_are_the_studys_own_distribution():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    study = optuna.create_study()  # (in memory) a study whose trials drew from choice(8, 16) and range(1, 4)
    first = {"build.hidden_units": CategoricalDistribution([8, 16]), "build.hidden_layers": IntDistribution(1, 3),
             "build.dropout_rate": FloatDistribution(0.0, 0.5)}
    study.tell(study.ask(first), 0.5)
    space, _ = search.search_space(["build.hidden_units=choice(16, 8)", "build.hidden_layers=choice(3, 1, 2)",
                                    "build.dropout_rate=interval(0.0, 0.4)", "build.embedding_dim=choice(8, 16)"])
    kept = search.as_in_study(space, study.trials)
    assert kept["build.hidden_units"] == first["build.hidden_units"]
    assert kept["build.hidden_layers"] == first["build.hidden_layers"]
    assert kept["build.dropout_rate"] == FloatDistribution(0.0, 0.4)  # another interval: as asked
    assert kept["build.embedding_dim"] == CategoricalDistribution([8, 16])  # new to the study: as asked
    study.tell(study.ask(kept), 0.6)  # Optuna takes it (the order as typed: "does not support dynamic value space")
    with pytest.raises(ValueError):
        study.ask(space)
