"""Hydra instantiates a sweeper only from the `hydra_plugins` namespace (hydra.core.plugins.Plugins scans it):
this names pipeline.search.OptunaSweeper there, for conf/hydra/sweeper/optuna.yaml. Cheap to import: Hydra
imports every plugin module at start, and Optuna is imported only when a search runs."""

from pipeline import search


class OptunaSweeper(search.OptunaSweeper):
    """pipeline.search.OptunaSweeper (docs/search.md), under the name Hydra accepts."""
