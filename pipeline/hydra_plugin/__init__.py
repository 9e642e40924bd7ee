"""Installed as `hydra_plugins.pipeline_search` (pyproject.toml's package-dir): Hydra builds a sweeper only from
a class of a module under `hydra_plugins` (Plugins.is_in_toplevel_plugins_module), imported by that name. This
names pipeline.search.OptunaSweeper there, for conf/hydra/sweeper/optuna.yaml (Optuna loads only when a search runs),
and pipeline.budgets.BudgetSweeper, which pipeline.sweep puts in place of Hydra's basic sweeper."""

from pipeline import budgets, search


class OptunaSweeper(search.OptunaSweeper):
    """pipeline.search.OptunaSweeper (docs/search.md), under the name Hydra accepts."""


class BudgetSweeper(budgets.BudgetSweeper):
    """pipeline.budgets.BudgetSweeper (one training for a sweep's fit.epochs budgets), under the name Hydra accepts."""
